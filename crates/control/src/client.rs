//! The CLI's side of the API: JSON requests to one daemon, over its Unix socket on this
//! machine or over SSH to another ([`Host`]).
//!
//! Over SSH, the client runs the system `ssh` (the user's config, keys and agent) with the
//! remote command `kiln dial-stdio`, which joins the remote daemon's socket to ssh's stdin and
//! stdout; HTTP/1.1 then runs over that one byte stream. One `ssh` child carries every request
//! of a command (keep-alive), so a command pays one SSH handshake however many requests it
//! makes; a connection idle for [`SSH_IDLE`] is replaced before the daemon's own keep-alive
//! timeout could close it under a request. No ControlMaster socket or background `ssh` is left
//! behind: the child ends when the client is dropped.
//!
//! **Invariant:** the connection choice is made here only; callers see the same
//! `get`/`post`/`put`/`delete`/`get_text` whatever the transport, and a failure to reach a
//! remote daemon is one [`ClientError::Unreachable`] naming the host and ssh's (or the remote
//! kiln's) own last word.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("no kiln daemon is running on {}: start one with `kiln serve` (or use `kiln up`)", .0.display())]
    NotRunning(PathBuf),
    /// A remote daemon cannot be reached: ssh failed, or the remote kiln found no daemon.
    #[error("cannot reach the kiln daemon on {host}: {reason}")]
    Unreachable {
        /// The host, as a URL (`ssh://user@host:port/state`).
        host: String,
        /// ssh's or the remote kiln's own last word.
        reason: String,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The daemon's message.
        message: String,
    },
    /// The connection broke.
    #[error("talking to the kiln daemon: {0}")]
    Transport(String),
}

/// Why a `--host` value was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid host {value:?}: {reason} (expected ssh://[user@]host[:port][/remote/state] or unix:///path/kiln.sock)"
)]
pub struct HostError {
    value: String,
    reason: String,
}

/// Where a daemon is (`--host`, `KILN_HOST`, a context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A Unix socket on this machine (`unix:///path/kiln.sock`).
    Unix(PathBuf),
    /// A daemon on another machine, through the system `ssh`.
    Ssh(SshHost),
}

/// `ssh://[user@]host[:port][/remote/state/dir]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshHost {
    /// The remote user (default: ssh's choice, from its config).
    pub user: Option<String>,
    /// The host name or address (an IPv6 address without brackets).
    pub host: String,
    /// The SSH port (default: ssh's choice).
    pub port: Option<u16>,
    /// The remote daemon's `--state` (default: the remote kiln's own default).
    pub state: Option<String>,
}

impl Host {
    /// Parses a host URL.
    pub fn parse(value: &str) -> Result<Host, HostError> {
        let bad = |reason: &str| HostError {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = value.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("a unix socket path must be absolute"));
            }
            return Ok(Host::Unix(PathBuf::from(path)));
        }
        let Some(rest) = value.strip_prefix("ssh://") else {
            return Err(bad("unknown scheme"));
        };
        if value.chars().any(|c| c.is_control()) {
            return Err(bad("control characters are not allowed"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if let Some(u) = user {
            let ok = !u.is_empty()
                && !u.starts_with('-')
                && u.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(bad("the user may hold letters, digits, `.`, `_` and `-`"));
            }
        }
        let bracketed = hostport.starts_with('[');
        let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
            let (h, after) = inner
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address needs its closing `]`"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after `]`"))?),
            };
            (h, port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let host_ok = !host.is_empty()
            && !host.starts_with('-')
            && host.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (bracketed && c == ':')
            });
        if !host_ok {
            return Err(bad("the host may hold letters, digits, `.`, `_`, `-`"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
            ),
        };
        let state = match path {
            "" | "/" => None,
            p => Some(p.to_owned()),
        };
        Ok(Host::Ssh(SshHost {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
            state,
        }))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Unix(p) => write!(f, "unix://{}", p.display()),
            Host::Ssh(s) => {
                f.write_str("ssh://")?;
                if let Some(u) = &s.user {
                    write!(f, "{u}@")?;
                }
                if s.host.contains(':') {
                    write!(f, "[{}]", s.host)?;
                } else {
                    f.write_str(&s.host)?;
                }
                if let Some(p) = s.port {
                    write!(f, ":{p}")?;
                }
                if let Some(st) = &s.state {
                    f.write_str(st)?;
                }
                Ok(())
            }
        }
    }
}

/// How to run ssh to a [`SshHost`].
#[derive(Debug, Clone)]
pub struct SshTransport {
    /// The host.
    pub host: SshHost,
    /// The ssh program and arguments before kiln's own (`["ssh"]`, or `KILN_SSH_COMMAND`).
    pub command: Vec<String>,
    /// The kiln binary on the remote (`kiln` on its PATH, or `KILN_REMOTE_BIN`).
    pub remote_bin: String,
    /// `-o BatchMode=yes`: never prompt (for `--json` and when stdin is not a terminal).
    pub batch: bool,
}

impl SshTransport {
    /// The shell command ssh asks the remote to run.
    pub fn remote_command(&self) -> String {
        let mut c = shell_quote(&self.remote_bin);
        if let Some(state) = &self.host.state {
            c.push_str(" --state ");
            c.push_str(&shell_quote(state));
        }
        c.push_str(" dial-stdio");
        c
    }

    /// The whole ssh command line: program, then arguments.
    pub fn argv(&self) -> Vec<String> {
        let mut argv: Vec<String> = if self.command.is_empty() {
            vec!["ssh".to_owned()]
        } else {
            self.command.clone()
        };
        // No terminal: the stream carries HTTP bytes, and the escape character is off.
        argv.push("-T".to_owned());
        if self.batch {
            argv.extend(["-o".to_owned(), "BatchMode=yes".to_owned()]);
        }
        if let Some(p) = self.host.port {
            argv.extend(["-p".to_owned(), p.to_string()]);
        }
        if let Some(u) = &self.host.user {
            argv.extend(["-l".to_owned(), u.clone()]);
        }
        argv.push("--".to_owned());
        argv.push(self.host.host.clone());
        argv.push(self.remote_command());
        argv
    }

    fn url(&self) -> String {
        Host::Ssh(self.host.clone()).to_string()
    }
}

/// `s` as one word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How long an SSH connection may sit idle before the next request opens a new one: under
/// the daemon's keep-alive timeout (`api::HEADER_READ_TIMEOUT`), so the daemon never closes it
/// as a request goes out.
pub const SSH_IDLE: Duration = Duration::from_secs(5);

/// The body of every request: JSON in memory, or a blob streamed from a file.
type ReqBody = BoxBody<Bytes, std::io::Error>;

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
}

#[derive(Debug, Clone)]
enum Endpoint {
    Unix(PathBuf),
    Ssh(Arc<SshLink>),
}

impl Client {
    /// A client of the daemon serving `socket`.
    pub fn new(socket: &Path) -> Client {
        Client {
            endpoint: Endpoint::Unix(socket.to_owned()),
        }
    }

    /// A client of a remote daemon, through ssh.
    pub fn ssh(transport: SshTransport) -> Client {
        Client {
            endpoint: Endpoint::Ssh(Arc::new(SshLink {
                transport,
                conn: tokio::sync::Mutex::new(None),
            })),
        }
    }

    /// Where the daemon is, for messages.
    pub fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Ssh(l) => l.transport.url(),
        }
    }

    /// Whether a daemon answers.
    pub async fn alive(&self) -> bool {
        self.get("/v1/health").await.is_ok()
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::DELETE, path, None).await
    }

    /// `GET path` returning text (metrics).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let req = request(Method::GET, path, "application/json", empty())?;
        let (_, bytes) = self.raw(req).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `PUT path` with `len` bytes read from `reader` (on a blocking thread, a chunk at a
    /// time: never the whole body in memory); the answer is JSON.
    pub async fn put_stream(
        &self,
        path: &str,
        content_type: &str,
        len: u64,
        reader: Box<dyn Read + Send>,
    ) -> Result<Value, ClientError> {
        let body = ReaderBody::spawn(reader, len);
        let req = request(Method::PUT, path, content_type, body.boxed())?;
        let (status, bytes) = self.raw(req).await?;
        json_answer(status, &bytes)
    }

    /// `PUT path` with raw bytes (a manifest); the answer is JSON.
    pub async fn put_bytes(
        &self,
        path: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<Value, ClientError> {
        let body = Full::new(Bytes::from(bytes))
            .map_err(|never| match never {})
            .boxed();
        let req = request(Method::PUT, path, content_type, body)?;
        let (status, bytes) = self.raw(req).await?;
        json_answer(status, &bytes)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        // A GET is safe to repeat: a connection that broke before its answer (a daemon
        // restarting under us) is tried again, briefly.
        let mut tries = if method == Method::GET { 3 } else { 1 };
        let (status, bytes) = loop {
            tries -= 1;
            let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
            let body = Full::new(bytes).map_err(|never| match never {}).boxed();
            let req = request(method.clone(), path, "application/json", body)?;
            match self.raw(req).await {
                Err(ClientError::Transport(_)) if tries > 0 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        json_answer(status, &bytes)
    }

    async fn raw(&self, req: Request<ReqBody>) -> Result<(StatusCode, Bytes), ClientError> {
        match &self.endpoint {
            Endpoint::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(|_| ClientError::NotRunning(socket.clone()))?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| ClientError::Transport(e.to_string()))?;
                tokio::spawn(conn);
                exchange(&mut send, req)
                    .await
                    .map_err(|e| ClientError::Transport(e.to_string()))
            }
            Endpoint::Ssh(link) => link.request(req).await,
        }
    }
}

fn empty() -> ReqBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn request(
    method: Method,
    path: &str,
    content_type: &str,
    body: ReqBody,
) -> Result<Request<ReqBody>, ClientError> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "kiln")
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(body)
        .map_err(|e| ClientError::Transport(e.to_string()))
}

fn json_answer(status: StatusCode, bytes: &[u8]) -> Result<Value, ClientError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ClientError::Transport(format!("the daemon sent invalid JSON: {e}")))?;
    if status.is_success() {
        Ok(value)
    } else {
        Err(ClientError::Api {
            status,
            message: value["error"]
                .as_str()
                .unwrap_or("unknown error")
                .to_owned(),
        })
    }
}

/// Sends one request on a connection and reads its whole answer.
async fn exchange(
    send: &mut SendRequest<ReqBody>,
    req: Request<ReqBody>,
) -> Result<(StatusCode, Bytes), hyper::Error> {
    send.ready().await?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// One remote daemon's SSH connection, opened at the first request and reused.
struct SshLink {
    transport: SshTransport,
    conn: tokio::sync::Mutex<Option<SshConn>>,
}

impl fmt::Debug for SshLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshLink")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

struct SshConn {
    send: SendRequest<ReqBody>,
    last_used: Instant,
    exit: tokio::sync::watch::Receiver<Option<SshExit>>,
}

/// How the ssh child ended, and the end of what it wrote on stderr.
#[derive(Debug, Clone)]
struct SshExit {
    code: Option<i32>,
    stderr: String,
}

/// The most of ssh's stderr kept for an error message.
const STDERR_TAIL: usize = 8 << 10;

impl SshLink {
    async fn request(&self, req: Request<ReqBody>) -> Result<(StatusCode, Bytes), ClientError> {
        // One request at a time on the one connection (HTTP/1.1).
        let mut slot = self.conn.lock().await;
        let stale = slot
            .as_ref()
            .is_none_or(|c| c.send.is_closed() || c.last_used.elapsed() > SSH_IDLE);
        if stale {
            *slot = None;
            *slot = Some(self.connect().await?);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(ClientError::Transport("no connection".to_owned()));
        };
        match exchange(&mut conn.send, req).await {
            Ok(answer) => {
                conn.last_used = Instant::now();
                Ok(answer)
            }
            Err(e) => {
                let exit = conn.exit.clone();
                *slot = None;
                Err(self.failure(exit, &e.to_string()).await)
            }
        }
    }

    async fn connect(&self) -> Result<SshConn, ClientError> {
        let argv = self.transport.argv();
        let unreachable = |reason: String| ClientError::Unreachable {
            host: self.transport.url(),
            reason,
        };
        // One socket end is ssh's stdin and stdout both; the other is this client's stream.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| unreachable(format!("cannot make a socket pair for ssh: {e}")))?;
        let theirs_out = theirs
            .try_clone()
            .map_err(|e| unreachable(format!("cannot duplicate a socket for ssh: {e}")))?;
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                theirs,
            )))
            .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                theirs_out,
            )))
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            unreachable(format!(
                "cannot run {:?}: {e} (install openssh-client, or set KILN_SSH_COMMAND)",
                argv[0]
            ))
        })?;
        let (tx, exit) = tokio::sync::watch::channel(None);
        let stderr = child.stderr.take();
        // ssh is reaped by this thread, which also keeps the tail of what it says.
        std::thread::Builder::new()
            .name("kiln-ssh".to_owned())
            .spawn(move || {
                let mut tail = Vec::new();
                if let Some(mut err) = stderr {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = err.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        tail.extend_from_slice(&buf[..n]);
                        if tail.len() > STDERR_TAIL {
                            tail.drain(..tail.len() - STDERR_TAIL);
                        }
                    }
                }
                let code = child.wait().ok().and_then(|s| s.code());
                let _ = tx.send(Some(SshExit {
                    code,
                    stderr: String::from_utf8_lossy(&tail).into_owned(),
                }));
            })
            .map_err(|e| unreachable(format!("cannot start a thread for ssh: {e}")))?;
        ours.set_nonblocking(true)
            .map_err(|e| unreachable(format!("cannot set up the ssh socket: {e}")))?;
        let stream = tokio::net::UnixStream::from_std(ours)
            .map_err(|e| unreachable(format!("cannot set up the ssh socket: {e}")))?;
        let (send, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => return Err(self.failure(exit, &e.to_string()).await),
        };
        tokio::spawn(conn);
        Ok(SshConn {
            send,
            last_used: Instant::now(),
            exit,
        })
    }

    /// The error for a request that failed on the ssh stream: ssh's own reason when it
    /// exited (it does soon after a failure), else the HTTP error.
    async fn failure(
        &self,
        mut exit: tokio::sync::watch::Receiver<Option<SshExit>>,
        http: &str,
    ) -> ClientError {
        let ended = tokio::time::timeout(Duration::from_secs(5), exit.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|v| v.clone()));
        let Some(ended) = ended else {
            return ClientError::Transport(format!(
                "the connection to {} broke: {http}",
                self.transport.url()
            ));
        };
        let said = last_word(&ended.stderr);
        let reason = match (ended.code, said) {
            (Some(127), said) => format!(
                "the remote has no kiln binary {:?} ({}); name it with KILN_REMOTE_BIN or \
                 `kiln context create --remote-bin`",
                self.transport.remote_bin,
                said.unwrap_or("command not found")
            ),
            (_, Some(said)) => said.to_owned(),
            (Some(code), None) => format!("ssh exited with status {code}"),
            (None, None) => "ssh was killed by a signal".to_owned(),
        };
        ClientError::Unreachable {
            host: self.transport.url(),
            reason,
        }
    }
}

/// The last line of ssh's stderr that says something: not a known-hosts notice, without the
/// remote kiln's `error: ` prefix.
fn last_word(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
}

/// A request body read from a [`Read`] on a blocking thread, a chunk at a time, with its
/// length known up front (so it goes out with `Content-Length`).
struct ReaderBody {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    len: u64,
}

/// The size of one chunk of a streamed body.
const CHUNK: usize = 256 << 10;

impl ReaderBody {
    fn spawn(mut reader: Box<dyn Read + Send>, len: u64) -> ReaderBody {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            loop {
                let mut buf = vec![0u8; CHUNK];
                match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        });
        ReaderBody { rx, len }
    }
}

impl Body for ReaderBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn ssh_hosts_parse_and_print_back() {
        for (url, user, host, port, state) in [
            ("ssh://h", None, "h", None, None),
            (
                "ssh://root@127.0.0.1:2222/srv/kiln",
                Some("root"),
                "127.0.0.1",
                Some(2222),
                Some("/srv/kiln"),
            ),
            (
                "ssh://deploy@example.com/",
                Some("deploy"),
                "example.com",
                None,
                None,
            ),
            ("ssh://[::1]:22", None, "::1", Some(22), None),
        ] {
            let Host::Ssh(s) = Host::parse(url).unwrap() else {
                panic!("{url}")
            };
            assert_eq!(
                (
                    s.user.as_deref(),
                    s.host.as_str(),
                    s.port,
                    s.state.as_deref()
                ),
                (user, host, port, state),
                "{url}"
            );
            let printed = Host::Ssh(s).to_string();
            assert_eq!(printed, url.trim_end_matches('/'), "{url}");
        }
        assert_eq!(
            Host::parse("unix:///run/kiln.sock").unwrap(),
            Host::Unix(PathBuf::from("/run/kiln.sock"))
        );
    }

    #[test]
    fn bad_hosts_are_refused_saying_why() {
        for (url, why) in [
            ("tcp://h", "unknown scheme"),
            ("unix://relative.sock", "absolute"),
            ("ssh://", "host"),
            ("ssh://-oProxyCommand=x", "host"),
            ("ssh://-l@h", "user"),
            ("ssh://h:0", "port"),
            ("ssh://h:99999", "port"),
            ("ssh://h;rm:22", "host"),
            ("ssh://h/x\ny", "control"),
        ] {
            let e = Host::parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn the_ssh_command_line_quotes_the_remote_command() {
        let Host::Ssh(host) = Host::parse("ssh://root@h:2222/srv/it's").unwrap() else {
            panic!()
        };
        let t = SshTransport {
            host,
            command: vec!["ssh".into(), "-F".into(), "/tmp/cfg".into()],
            remote_bin: "/opt/kiln bin/kiln".into(),
            batch: true,
        };
        assert_eq!(
            t.argv(),
            [
                "ssh",
                "-F",
                "/tmp/cfg",
                "-T",
                "-o",
                "BatchMode=yes",
                "-p",
                "2222",
                "-l",
                "root",
                "--",
                "h",
                r"'/opt/kiln bin/kiln' --state '/srv/it'\''s' dial-stdio"
            ]
        );
    }

    #[test]
    fn the_last_word_skips_notices_and_prefixes() {
        assert_eq!(
            last_word(
                "Warning: Permanently added 'x' (ED25519) to the list of known hosts.\r\nerror: no kiln daemon is running on /s/kiln.sock\n"
            ),
            Some("no kiln daemon is running on /s/kiln.sock")
        );
        assert_eq!(last_word("\n"), None);
    }
}
