//! The access log: one JSON object per line per response, written to a file or stdout, off
//! unless asked for.
//!
//! A line: `time` (RFC 3339, milliseconds, UTC, when the response ended), `app`, `release`,
//! `instance` (`null` when the router answered itself before choosing one), `method`, `path`
//! (without the query, which may carry secrets), `status`, `bytes` (response body bytes sent
//! to the client), `duration_ms` (from the request's arrival to its response's end),
//! `request_id`, `client` (the peer's address). A response is logged when its body has been
//! sent or dropped.
//!
//! A request its client gave up on before its response head is logged with status 499 (nginx's
//! "client closed request") and 0 bytes: at once when its future is dropped (an HTTP/2 stream
//! reset, a connection gone); an HTTP/1.1 client's socket is not watched while its request
//! waits (the listener's `half_close`: a probe per request costs), so a client that left is
//! noticed when the answer is ready, by one peek at the socket for a request that waited at
//! least 100 ms (`duration_ms` then runs to the answer). A quicker one is logged as answered,
//! as is one whose client's last words were a TLS `close_notify`; and a client that shut down
//! only its sending side after a slow request counts as gone, as nginx counts it.
//!
//! Sampling: a rate between 0 and 1 of responses is logged, drawn per response; a 5xx and a
//! 499 are always logged, so that failures are never sampled away.
//!
//! Rotation: [`AccessLog::reopen`] (the router process calls it on SIGHUP, logrotate's
//! `postrotate` convention) opens the file at its path anew. Lines taken before it go to the
//! file it had (renamed, say), every line after to the new one: none is lost or written twice.
//!
//! **Hot path:** off, it costs a branch per request (and one per body frame). On, a logged
//! response renders its line into its thread's own buffer (a mutex no other router thread
//! takes); a writer thread takes every buffer's lines every [`FLUSH_EVERY`] (or sooner, woken
//! when a buffer passes [`WAKE_AT`]) and writes them. A router thread never waits on disk
//! I/O: when the writer falls behind and a buffer reaches [`MAX_BUFFERED`], lines are dropped
//! and counted (a warning says how many), never queued without bound.

use std::cell::RefCell;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant, SystemTime};

/// How often the writer takes the threads' lines.
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// A thread's buffer this large wakes the writer early.
const WAKE_AT: usize = 64 << 10;

/// A thread's buffer this large takes no more lines until the writer takes them.
const MAX_BUFFERED: usize = 8 << 20;

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// The process's standard output.
    Stdout,
    /// A file, created if missing and appended to; opened anew by [`AccessLog::reopen`].
    File(PathBuf),
}

/// What the access log writes and where.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    /// Where lines go.
    pub target: AccessLogTarget,
    /// The share of responses logged, from 0 to 1; 5xx responses are always logged.
    pub sample: f64,
}

/// Why the access log cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The file could not be opened for appending.
    #[error("cannot open the access log {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The sampling rate is not a number from 0 to 1.
    #[error("the access log's sampling rate must be from 0 to 1, got {0}")]
    Sample(f64),
    /// The writer thread could not start.
    #[error("cannot start the access log's writer thread: {0}")]
    Thread(std::io::Error),
}

/// An open access log, shared by the listeners of a router (cheap to clone). Its writer thread
/// writes what is left and stops when the last clone is dropped.
#[derive(Clone)]
pub struct AccessLog {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("target", &self.handle.sink.target)
            .finish_non_exhaustive()
    }
}

struct Handle {
    sink: Arc<Sink>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Which responses are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sampler {
    /// Every response.
    all: bool,
    /// Else a response is logged when a random `u64` falls below this.
    below: u64,
}

impl Sampler {
    fn new(rate: f64) -> Result<Sampler, AccessLogError> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(AccessLogError::Sample(rate));
        }
        // 2^64 as a float; the product is below it, so the cast does not saturate but at 1.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let below = (rate * 18_446_744_073_709_551_616.0) as u64;
        Ok(Sampler {
            all: rate >= 1.0,
            below,
        })
    }

    fn logs(&self, status: u16, random: impl FnOnce() -> u64) -> bool {
        self.all || status >= 500 || (self.below > 0 && random() < self.below)
    }
}

struct Sink {
    id: u64,
    target: AccessLogTarget,
    sampler: Sampler,
    out: Mutex<Box<dyn Write + Send>>,
    /// One per router thread that logged.
    buffers: Mutex<Vec<Arc<Buffer>>>,
    closed: AtomicBool,
    writer: std::sync::OnceLock<Thread>,
}

/// One thread's lines not yet written.
struct Buffer {
    lines: Mutex<Vec<u8>>,
    /// Lines dropped because the buffer was full.
    dropped: AtomicU64,
    writer: Option<Thread>,
}

/// Tells each log apart in a thread's list of buffers.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's buffer for each open log (nearly always one).
    static BUFFERS: RefCell<Vec<(u64, Arc<Buffer>)>> = const { RefCell::new(Vec::new()) };
}

impl AccessLog {
    /// Opens the target (a file is created if missing and appended to) and starts the writer
    /// thread.
    pub fn open(config: &AccessLogConfig) -> Result<AccessLog, AccessLogError> {
        let sampler = Sampler::new(config.sample)?;
        let out: Box<dyn Write + Send> = match &config.target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(open_file(path)?),
        };
        let sink = Arc::new(Sink {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            target: config.target.clone(),
            sampler,
            out: Mutex::new(out),
            buffers: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            writer: std::sync::OnceLock::new(),
        });
        let writing = Arc::clone(&sink);
        let writer = std::thread::Builder::new()
            .name("kiln-access-log".to_owned())
            .spawn(move || write_until_closed(&writing))
            .map_err(AccessLogError::Thread)?;
        let _ = sink.writer.set(writer.thread().clone());
        Ok(AccessLog {
            handle: Arc::new(Handle {
                sink,
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Writes every thread's buffered lines now (a router about to exit).
    pub fn flush(&self) {
        let mut spare = Vec::new();
        write_out(&self.handle.sink, &mut spare, &mut false);
    }

    /// Opens the file at its path anew (after logrotate renamed it): the lines buffered until
    /// now are written to the file the log had, every later one to the new file. Standard
    /// output has nothing to reopen. On an error the log goes on writing to the file it had.
    pub fn reopen(&self) -> Result<(), AccessLogError> {
        let sink = &self.handle.sink;
        let AccessLogTarget::File(path) = &sink.target else {
            return Ok(());
        };
        // Held from the last write to the old file to the swap, and the new file made only
        // after that write: a line is taken either before (the old file) or after (the new
        // one), once, and every line rendered once the new file exists is written to it. The
        // router's threads never take this lock.
        let mut out = lock(&sink.out);
        write_buffers(sink, &mut **out, &mut Vec::new(), &mut false);
        *out = Box::new(open_file(path)?);
        Ok(())
    }

    /// Whether a response with `status` is logged (drawn anew per call).
    pub(crate) fn logs(&self, status: u16) -> bool {
        self.handle
            .sink
            .sampler
            .logs(status, crate::request_id::random)
    }

    /// Starts a line for a response to be logged: its fields known when its head is sent.
    pub(crate) fn begin(&self, fields: &Fields<'_>, arrived: Instant) -> Box<Pending> {
        let (line, cut) = render_head(fields);
        Box::new(Pending {
            buffer: self.buffer(),
            arrived,
            bytes: 0,
            line,
            cut,
        })
    }

    /// This thread's buffer, registered with the sink on first use.
    fn buffer(&self) -> Arc<Buffer> {
        let sink = &self.handle.sink;
        BUFFERS.with_borrow_mut(|list| {
            if let Some((_, buffer)) = list.iter().find(|(id, _)| *id == sink.id) {
                return Arc::clone(buffer);
            }
            // Buffers of logs since closed are held by nothing else.
            list.retain(|(_, buffer)| Arc::strong_count(buffer) > 1);
            let buffer = Arc::new(Buffer {
                lines: Mutex::new(Vec::new()),
                dropped: AtomicU64::new(0),
                writer: sink.writer.get().cloned(),
            });
            lock(&sink.buffers).push(Arc::clone(&buffer));
            list.push((sink.id, Arc::clone(&buffer)));
            buffer
        })
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.sink.closed.store(true, Ordering::Release);
        if let Some(writer) = lock(&self.writer).take() {
            writer.thread().unpark();
            let _ = writer.join();
        }
    }
}

/// The writer thread: takes and writes the buffers' lines until the log is closed, then once
/// more.
fn write_until_closed(sink: &Sink) {
    let mut spare = Vec::new();
    let mut failing = false;
    loop {
        std::thread::park_timeout(FLUSH_EVERY);
        let closed = sink.closed.load(Ordering::Acquire);
        write_out(sink, &mut spare, &mut failing);
        if closed {
            return;
        }
    }
}

/// Opens `path` for appending, creating it if missing.
fn open_file(path: &std::path::Path) -> Result<std::fs::File, AccessLogError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Takes every buffer's lines (swapped with `spare`, so no allocation in the steady state)
/// and writes them. A failure is warned about once until a write succeeds again.
fn write_out(sink: &Sink, spare: &mut Vec<u8>, failing: &mut bool) {
    let mut out = lock(&sink.out);
    write_buffers(sink, &mut **out, spare, failing);
}

/// [`write_out`] to `out`, which the caller holds locked.
fn write_buffers(sink: &Sink, out: &mut dyn Write, spare: &mut Vec<u8>, failing: &mut bool) {
    let buffers: Vec<Arc<Buffer>> = lock(&sink.buffers).clone();
    let mut dropped = 0;
    let mut result = Ok(());
    for buffer in buffers {
        spare.clear();
        std::mem::swap(&mut *lock(&buffer.lines), spare);
        dropped += buffer.dropped.swap(0, Ordering::Relaxed);
        if !spare.is_empty() && result.is_ok() {
            result = out.write_all(spare);
        }
    }
    spare.clear();
    let result = result.and_then(|()| out.flush());
    match result {
        Ok(()) => *failing = false,
        Err(error) if !*failing => {
            *failing = true;
            tracing::warn!(target = ?sink.target, %error, "cannot write the access log: lines are lost until it can");
        }
        Err(_) => {}
    }
    if dropped > 0 {
        tracing::warn!(target = ?sink.target, dropped, "access log lines dropped: the writer fell behind");
    }
}

/// What a line says that is known when the response head is sent.
pub(crate) struct Fields<'a> {
    pub(crate) app: Option<&'a str>,
    pub(crate) release: Option<&'a str>,
    pub(crate) instance: Option<SocketAddr>,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) status: u16,
    pub(crate) request_id: &'a str,
    pub(crate) client: IpAddr,
}

/// A response being logged: its line is written when this is dropped (its body sent whole,
/// or the connection gone).
pub(crate) struct Pending {
    buffer: Arc<Buffer>,
    arrived: Instant,
    bytes: u64,
    /// The fields from `app` to `status`, then from `request_id` to the end.
    line: Vec<u8>,
    /// Where `bytes` and `duration_ms` go in `line`.
    cut: usize,
}

impl Pending {
    /// `n` more body bytes were sent.
    pub(crate) fn sent(&mut self, n: usize) {
        self.bytes = self.bytes.saturating_add(n as u64);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let duration = self.arrived.elapsed();
        let time = SystemTime::now();
        let mut lines = lock(&self.buffer.lines);
        if lines.len() >= MAX_BUFFERED {
            self.buffer.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        render_line(&mut lines, time, &self.line, self.cut, self.bytes, duration);
        if lines.len() >= WAKE_AT
            && let Some(writer) = &self.buffer.writer
        {
            writer.unpark();
        }
    }
}

/// The line's fields known at the response head, and where the rest goes.
fn render_head(f: &Fields<'_>) -> (Vec<u8>, usize) {
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(b"\"app\":");
    json_opt(&mut line, f.app);
    line.extend_from_slice(b",\"release\":");
    json_opt(&mut line, f.release);
    line.extend_from_slice(b",\"instance\":");
    match f.instance {
        Some(addr) => {
            let _ = write!(line, "\"{addr}\"");
        }
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"method\":");
    json_str(&mut line, f.method);
    line.extend_from_slice(b",\"path\":");
    json_str(&mut line, f.path);
    let _ = write!(line, ",\"status\":{}", f.status);
    let cut = line.len();
    line.extend_from_slice(b",\"request_id\":");
    json_str(&mut line, f.request_id);
    let _ = writeln!(line, ",\"client\":\"{}\"}}", f.client);
    (line, cut)
}

/// Appends the whole line to `out`.
fn render_line(
    out: &mut Vec<u8>,
    time: SystemTime,
    line: &[u8],
    cut: usize,
    bytes: u64,
    duration: Duration,
) {
    let (head, tail) = line.split_at(cut.min(line.len()));
    let _ = write!(
        out,
        "{{\"time\":\"{}\",",
        humantime::format_rfc3339_millis(time)
    );
    out.extend_from_slice(head);
    let micros = duration.as_micros();
    let _ = write!(
        out,
        ",\"bytes\":{bytes},\"duration_ms\":{}.{:03}",
        micros / 1000,
        micros % 1000
    );
    out.extend_from_slice(tail);
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(out, s);
}

fn json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn fields() -> Fields<'static> {
        Fields {
            app: Some("shop"),
            release: Some("v3"),
            instance: Some("10.88.0.5:8080".parse().unwrap()),
            method: "GET",
            path: "/a\"b\\c",
            status: 200,
            request_id: "abc",
            client: "10.1.2.3".parse().unwrap(),
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_every_field_in_order() {
        let (head, cut) = render_head(&fields());
        let mut out = Vec::new();
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        render_line(
            &mut out,
            time,
            &head,
            cut,
            42,
            Duration::from_micros(1_234_567),
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "{\"time\":\"2023-11-14T22:13:20.123Z\",\"app\":\"shop\",\"release\":\"v3\",\
             \"instance\":\"10.88.0.5:8080\",\"method\":\"GET\",\"path\":\"/a\\\"b\\\\c\",\
             \"status\":200,\"bytes\":42,\"duration_ms\":1234.567,\"request_id\":\"abc\",\
             \"client\":\"10.1.2.3\"}\n"
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["path"], "/a\"b\\c");
        assert_eq!(value["duration_ms"], 1234.567);
    }

    #[test]
    fn a_response_the_router_answered_alone_has_null_app_release_and_instance() {
        let f = Fields {
            app: None,
            release: None,
            instance: None,
            status: 404,
            ..fields()
        };
        let (head, cut) = render_head(&f);
        let mut out = Vec::new();
        render_line(
            &mut out,
            SystemTime::UNIX_EPOCH,
            &head,
            cut,
            0,
            Duration::ZERO,
        );
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(value["app"].is_null() && value["release"].is_null());
        assert!(value["instance"].is_null());
        assert_eq!(value["duration_ms"], 0.0);
        assert_eq!(value["time"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn sampling_keeps_its_share_and_every_5xx() {
        let never = Sampler::new(0.0).unwrap();
        let always = Sampler::new(1.0).unwrap();
        let tenth = Sampler::new(0.1).unwrap();
        let mut state = 7_u64;
        let mut random = || {
            state = state.wrapping_add(crate::request_id::GOLDEN);
            crate::request_id::mix(state)
        };
        let mut logged = 0;
        for _ in 0..100_000 {
            assert!(!never.logs(200, &mut random));
            assert!(never.logs(503, &mut random));
            assert!(always.logs(200, &mut random));
            if tenth.logs(200, &mut random) {
                logged += 1;
            }
        }
        // A fixed seed: the count is always the same, and near a tenth.
        assert!((9_000..11_000).contains(&logged), "{logged}");
        assert!(Sampler::new(1.5).is_err() && Sampler::new(-0.1).is_err());
        assert!(Sampler::new(f64::NAN).is_err());
    }

    #[test]
    fn lines_reach_the_file_when_flushed_and_when_closed() {
        let dir = std::env::temp_dir().join(format!("kiln-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::open(&AccessLogConfig {
            target: AccessLogTarget::File(path.clone()),
            sample: 1.0,
        })
        .unwrap();
        assert!(log.logs(200));
        drop(log.begin(&fields(), Instant::now()));
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        // Another thread's line, written when the log closes.
        let other = log.clone();
        std::thread::spawn(move || drop(other.begin(&fields(), Instant::now())))
            .join()
            .unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["app"], "shop");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reopen_writes_what_was_taken_to_the_old_file_and_every_later_line_to_the_new() {
        let dir = std::env::temp_dir().join(format!("kiln-access-reopen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let rotated = dir.join("access.log.1");
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::open(&AccessLogConfig {
            target: AccessLogTarget::File(path.clone()),
            sample: 1.0,
        })
        .unwrap();
        let line = |request_id: &'static str| {
            drop(log.begin(
                &Fields {
                    request_id,
                    ..fields()
                },
                Instant::now(),
            ));
        };
        line("written");
        log.flush();
        std::fs::rename(&path, &rotated).unwrap();
        // Still buffered when the log is reopened: it belongs to the old file.
        line("buffered");
        log.reopen().unwrap();
        line("after");
        drop(log);
        let ids = |p: &std::path::Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v["request_id"].as_str().unwrap().to_owned()
                })
                .collect()
        };
        assert_eq!(ids(&rotated), ["written", "buffered"]);
        assert_eq!(ids(&path), ["after"]);
        // Standard output has nothing to reopen.
        let stdout = AccessLog::open(&AccessLogConfig {
            target: AccessLogTarget::Stdout,
            sample: 0.0,
        })
        .unwrap();
        stdout.reopen().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
