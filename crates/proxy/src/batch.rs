//! Client sockets whose writes leave together, at the end of the thread's current batch of
//! ready connections.
//!
//! hyper writes a response the moment its connection's task has it, so a thread serving many
//! connections interleaves: read an instance's answer, write it to its client, read the next
//! answer, write that one... Each write lands on a client that went to sleep waiting for it and
//! wakes it, and the woken client then takes a core from the router, once per response. HAProxy
//! runs its connections in phases instead (receive everything that is ready, then send
//! everything), so a client finds several responses when it wakes.
//!
//! Here a write to a client is copied into the connection's [`Outbox`] and the outbox joins
//! the thread's [`Flusher`] queue. The flusher is a task, woken by the first outbox of a batch,
//! so the runtime runs it after every task that was already ready: by then the batch's
//! responses are all written, and it sends them one after the other. A write is never held
//! longer than that: the flusher runs before the thread next waits for events.
//!
//! The flusher is per thread, so this applies on the router's own threads ([`crate::Workers`]:
//! a current-thread runtime each, which opt in with [`batch_this_thread`]). Elsewhere writes go
//! straight out: on a multi-thread runtime a connection's task moves between threads, and the
//! runtime runs a task woken from another one next rather than last.
//!
//! What a flush cannot send (a full socket buffer) is sent by the connection's own task on its
//! next read, write or flush, waiting for the socket; a connection dropped with bytes still to
//! send leaves them to a task of their own, bounded by [`FINISH_TIMEOUT`]. A client's socket
//! dropped while its client may still be sending lingers instead (see [`Socket::client`]).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use rustix::net::RecvFlags;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::runtime::{Handle, RuntimeFlavor};

/// The most an outbox holds; a write beyond it first waits for the socket to take the rest.
const OUTBOX_LIMIT: usize = 64 * 1024;

/// A write at least this big into an empty outbox goes straight to the socket: it is a batch
/// of its own (a chunk of a download), and copying it would cost more than it saves.
const DIRECT_WRITE: usize = 16 * 1024;

/// The buffer an emptied outbox keeps for the next response; a bigger one is freed.
const KEEP_CAPACITY: usize = 8 * 1024;

/// How long bytes left behind by a dropped connection may take to reach a slow client.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a closed client connection lingers, reading what its client still sends
/// (nginx's `lingering_time`).
const LINGER_TIME: Duration = Duration::from_secs(30);

/// A lingering connection whose client sends nothing for this long is closed (nginx's
/// `lingering_timeout`).
const LINGER_IDLE: Duration = Duration::from_secs(5);

/// What becomes of bytes still waiting when a [`Socket`] is dropped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum OnDrop {
    /// They are sent, then the socket closes (a client's response, a tunnel's bytes).
    Send,
    /// They are thrown away (a request to an instance that its exchange gave up on: sending
    /// it after the router chose to retry elsewhere could run it twice).
    Discard,
}

/// A TCP socket whose writes wait in an [`Outbox`] for the thread's [`Flusher`] (or go straight
/// out where there is none).
pub(crate) struct Socket {
    /// Always there; taken only by a dropped client socket that lingers.
    read: Option<OwnedReadHalf>,
    outbox: Arc<Outbox>,
    /// A client's socket: set once a request with a body arrived on it (see
    /// [`Socket::client`]).
    sent_body: Option<Arc<AtomicBool>>,
}

impl Socket {
    /// Wraps `stream`; its writes are batched when this thread runs a current-thread runtime.
    pub(crate) fn new(stream: TcpStream, on_drop: OnDrop) -> Socket {
        Socket::wrap(stream, on_drop, None)
    }

    /// Wraps a client's `stream`, whose response is sent when it is dropped. If the client may
    /// still be sending then (bytes nobody read wait on the socket, or `sent_body` says a
    /// request came with a body and the client has not closed its side), the socket lingers
    /// like nginx's lingering close: what waits is sent with the end of the stream, and what
    /// arrives is read and thrown away until the client closes ([`LINGER_IDLE`],
    /// [`LINGER_TIME`]). Closing a socket with unread bytes, or receiving bytes after closing
    /// it, makes the kernel reset the connection, and a client busy sending a body the router
    /// did not read (an instance answered early, the body was too large) would get the reset
    /// instead of the response that says why.
    pub(crate) fn client(stream: TcpStream, sent_body: Arc<AtomicBool>) -> Socket {
        Socket::wrap(stream, OnDrop::Send, Some(sent_body))
    }

    /// A watch on this client's connection for its requests (see [`ClientWatch`]).
    pub(crate) fn watch(&self) -> ClientWatch {
        ClientWatch(Arc::downgrade(&self.outbox))
    }

    fn wrap(stream: TcpStream, on_drop: OnDrop, sent_body: Option<Arc<AtomicBool>>) -> Socket {
        let (read, write) = stream.into_split();
        Socket {
            read: Some(read),
            sent_body,
            outbox: Arc::new(Outbox {
                flusher: Flusher::for_this_thread(),
                stalled: AtomicBool::new(false),
                out: Mutex::new(Out {
                    on_drop,
                    socket: write,
                    buf: Vec::new(),
                    sent: 0,
                    total_sent: 0,
                    queued: false,
                    task: None,
                    error: None,
                    detached: false,
                    lingering: false,
                }),
            }),
        }
    }

    /// The reading side and the writing side, to be polled at the same time.
    pub(crate) fn split(&mut self) -> (Reader<'_>, Writer<'_>) {
        let Socket { read, outbox, .. } = self;
        (Reader { read, outbox }, Writer(outbox))
    }

    /// Sends what waits in the outbox now, without waiting for the thread's batch.
    pub(crate) async fn send_waiting(&self) -> io::Result<()> {
        poll_fn(|cx| self.outbox.poll_drain(cx)).await
    }

    /// Throws away what waits in the outbox if no byte has reached the socket since
    /// `bytes_sent` said `before`; true then. One step under the outbox's lock, so a flush on
    /// another thread cannot send the bytes between the check and the discard.
    pub(crate) fn discard_if_unsent(&self, before: u64) -> bool {
        let mut out = self.outbox.lock();
        if out.total_sent != before {
            return false;
        }
        out.buf.clear();
        out.sent = 0;
        true
    }

    /// What becomes of waiting bytes when the socket is dropped (a tunnel's are sent).
    pub(crate) fn set_on_drop(&self, on_drop: OnDrop) {
        self.outbox.lock().on_drop = on_drop;
    }

    /// How many bytes have reached the socket so far (not counting what waits in the outbox).
    pub(crate) fn bytes_sent(&self) -> u64 {
        self.outbox.lock().total_sent
    }

    /// Reads without waiting (`WouldBlock` when nothing is there).
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.read {
            Some(read) => read.try_read(buf),
            None => Ok(0),
        }
    }

    /// Peeks at what is there to read, registering `cx` if nothing is.
    pub(crate) fn poll_peek(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        match &mut self.read {
            Some(read) => read.poll_peek(cx, buf),
            None => Poll::Ready(Ok(0)),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A client that cannot take its responses has nothing more to ask.
        let keep_reading = this.sent_body.is_none();
        poll_read(&mut this.read, &this.outbox, keep_reading, cx, buf)
    }
}

/// Reads, first sending what a flush could not: those bytes go out while the connection waits
/// for its next message (a pending send has registered the task for write readiness).
///
/// With `keep_reading`, a send that fails does not fail the read: it is kept for the next
/// write or flush, and the read goes on. An instance that stops reading may still have
/// answered (a 413 to a body it would not take), and its answer is in the socket to be read.
fn poll_read(
    read: &mut Option<OwnedReadHalf>,
    outbox: &Outbox,
    keep_reading: bool,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    if outbox.stalled.load(Ordering::Acquire)
        && let Poll::Ready(Err(error)) = outbox.poll_drain(cx)
    {
        if !keep_reading {
            return Poll::Ready(Err(error));
        }
        outbox.failed(error);
    }
    match read {
        Some(read) => Pin::new(read).poll_read(cx, buf),
        None => Poll::Ready(Ok(())),
    }
}

/// The reading side of a [`Socket`], from [`Socket::split`].
pub(crate) struct Reader<'a> {
    read: &'a mut Option<OwnedReadHalf>,
    outbox: &'a Outbox,
}

impl AsyncRead for Reader<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_read(this.read, this.outbox, true, cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.outbox.poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outbox.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outbox.poll_shutdown(cx)
    }
}

/// Whether a client is still there, asked by its requests while hyper holds its [`Socket`]
/// ([`Socket::watch`]).
#[derive(Clone)]
pub(crate) struct ClientWatch(Weak<Outbox>);

impl ClientWatch {
    /// Whether the client closed its side of the connection, or the connection broke: one
    /// non-blocking peek at the socket, which reads nothing. A client that shut down only its
    /// sending side looks the same as one that went away.
    pub(crate) fn closed(&self) -> bool {
        let Some(outbox) = self.0.upgrade() else {
            return true;
        };
        let out = outbox.lock();
        if out.detached || out.error.is_some() {
            return true;
        }
        let stream: &TcpStream = out.socket.as_ref();
        let mut probe = [0_u8; 1];
        match rustix::net::recv(stream, &mut probe, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            // The end of the stream; bytes waiting are the client's next request.
            Ok((n, _)) => n == 0,
            Err(rustix::io::Errno::WOULDBLOCK) => false,
            Err(_) => true,
        }
    }
}

impl Drop for Socket {
    /// With [`OnDrop::Send`], bytes still waiting are sent before the socket closes: the
    /// outbox keeps the socket's sending half, and the flusher (or a finishing task) holds the
    /// outbox until they are out. A client's socket whose client may still be sending lingers
    /// instead (see [`Socket::client`]): a task of its own holds both halves.
    fn drop(&mut self) {
        let mut out = self.outbox.lock();
        out.detached = true;
        if out.on_drop == OnDrop::Discard {
            out.buf.clear();
            out.sent = 0;
            return;
        }
        if let Some(sent_body) = &self.sent_body
            && let Some(read) = self.read.take()
            && still_sending(&read, sent_body)
            && let Ok(runtime) = Handle::try_current()
        {
            // The lingering task sends what waits: a flush leaves what it cannot send to it.
            out.lingering = true;
            drop(out);
            runtime.spawn(linger(read, Arc::clone(&self.outbox)));
            return;
        }
        // Without a running flusher (the runtime is going away) nothing would send them.
        if out.pending() > 0
            && !out.queued
            && let Some(flusher) = self.outbox.batching()
        {
            out.queued = true;
            drop(out);
            flusher.queue(Arc::clone(&self.outbox));
        }
    }
}

/// Whether a client may still be sending: bytes nobody read wait on the socket, or it sent a
/// body and has not closed its side. Asks the socket itself: the runtime's readiness may not
/// have seen the latest bytes.
fn still_sending(read: &OwnedReadHalf, sent_body: &AtomicBool) -> bool {
    let stream: &TcpStream = read.as_ref();
    let mut probe = [0_u8; 1];
    match rustix::net::recv(stream, &mut probe, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((n, _)) => n > 0,
        Err(rustix::io::Errno::WOULDBLOCK) => sent_body.load(Ordering::Relaxed),
        // A dead socket has nothing to linger for.
        Err(_) => false,
    }
}

/// Sends what waits and the end of the stream while reading and throwing away what the client
/// still sends, until it closes or goes quiet (see [`Socket::client`]). Both at once: a client
/// that sends without reading must not stall the answer it is waiting for.
async fn linger(mut read: OwnedReadHalf, outbox: Arc<Outbox>) {
    let send = async {
        if let Err(error) = poll_fn(|cx| outbox.poll_shutdown(cx)).await {
            tracing::debug!(%error, "sending the end of a lingering connection's response failed");
        }
    };
    let discard = async {
        let mut discard = vec![0_u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(LINGER_IDLE, read.read(&mut discard)).await
            && n > 0
        {}
    };
    let _ = tokio::time::timeout(LINGER_TIME, async { tokio::join!(send, discard) }).await;
}

/// The writing side of a [`Socket`], from [`Socket::split`].
pub(crate) struct Writer<'a>(&'a Arc<Outbox>);

impl AsyncWrite for Writer<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_shutdown(cx)
    }
}

/// A connection's bytes waiting for the flusher, and the socket's sending half.
struct Outbox {
    /// `None`: no batching on this thread, writes go straight out.
    flusher: Option<Arc<Flusher>>,
    /// A flush left bytes behind: the connection's task sends them.
    stalled: AtomicBool,
    out: Mutex<Out>,
}

struct Out {
    on_drop: OnDrop,
    socket: OwnedWriteHalf,
    buf: Vec<u8>,
    /// How much of `buf` has been sent.
    sent: usize,
    /// Bytes that reached the socket over its life.
    total_sent: u64,
    /// In the flusher's queue.
    queued: bool,
    /// The connection's task, woken when a flush leaves bytes behind or fails.
    task: Option<Waker>,
    /// A failed flush, for the connection's next write or flush.
    error: Option<io::Error>,
    /// The connection is gone; the outbox lives on only to send what is left.
    detached: bool,
    /// A lingering task holds the outbox and sends what is left itself.
    lingering: bool,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, Out> {
        // The lock is never held across anything that can panic and leave `Out` half-changed.
        lock(&self.out)
    }

    fn poll_write(self: &Arc<Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut out = self.lock();
        if let Some(error) = out.error.take() {
            return Poll::Ready(Err(error));
        }
        let Some(flusher) = self.batching() else {
            // Bytes queued while a flusher still ran go first.
            ready!(out.poll_send(cx))?;
            let n = ready!(Pin::new(&mut out.socket).poll_write(cx, data))?;
            out.total_sent += n as u64;
            return Poll::Ready(Ok(n));
        };
        if out.pending() > 0 && (!out.queued || out.pending() + data.len() > OUTBOX_LIMIT) {
            // Stalled, or no room: what is waiting goes first, in order.
            ready!(out.poll_send(cx))?;
            self.stalled.store(false, Ordering::Release);
        }
        if out.pending() == 0 && data.len() >= DIRECT_WRITE {
            let n = ready!(Pin::new(&mut out.socket).poll_write(cx, data))?;
            out.total_sent += n as u64;
            return Poll::Ready(Ok(n));
        }
        let take = data.len().min(OUTBOX_LIMIT - out.pending());
        out.buf.extend_from_slice(data.get(..take).unwrap_or(data));
        if !out.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            out.task = Some(cx.waker().clone());
        }
        if !out.queued {
            out.queued = true;
            drop(out);
            flusher.queue(Arc::clone(self));
        }
        Poll::Ready(Ok(take))
    }

    /// Ready once the bytes are the flusher's to send; waits for the socket only when a flush
    /// could not send them all.
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(error) = self.lock().error.take() {
            return Poll::Ready(Err(error));
        }
        if self.stalled.load(Ordering::Acquire) || self.batching().is_none() {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// The flusher that sends this outbox, if one is running.
    fn batching(&self) -> Option<&Arc<Flusher>> {
        self.flusher
            .as_ref()
            .filter(|f| f.alive.load(Ordering::Acquire))
    }

    /// Sends everything still waiting, then shuts down the sending side.
    fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = self.lock();
        if let Some(error) = out.error.take() {
            return Poll::Ready(Err(error));
        }
        ready!(out.poll_send(cx))?;
        self.stalled.store(false, Ordering::Release);
        Pin::new(&mut out.socket).poll_shutdown(cx)
    }

    /// Sends what a flush left behind, waiting for the socket.
    fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.lock().poll_send(cx))?;
        self.stalled.store(false, Ordering::Release);
        Poll::Ready(Ok(()))
    }

    /// A send failed where nobody could be told: the bytes waiting are dropped (the socket
    /// cannot take them) and the error goes to the next write or flush.
    fn failed(&self, error: io::Error) {
        let mut out = self.lock();
        out.buf.clear();
        out.sent = 0;
        out.error = Some(error);
        self.stalled.store(false, Ordering::Release);
    }

    /// The flusher's turn: sends what the socket takes now.
    fn flush(self: Arc<Self>) {
        let mut out = self.lock();
        out.queued = false;
        match out.send_now() {
            // A pooled connection must not keep the last writer's task alive through its waker.
            Ok(true) => out.task = None,
            // A lingering connection's task sends the rest.
            Ok(false) if out.lingering => {}
            Ok(false) if out.detached => {
                drop(out);
                tokio::spawn(finish(self));
            }
            Ok(false) => {
                self.stalled.store(true, Ordering::Release);
                if let Some(task) = out.task.take() {
                    task.wake();
                }
            }
            Err(error) => {
                out.buf.clear();
                out.sent = 0;
                if !out.detached {
                    out.error = Some(error);
                    if let Some(task) = out.task.take() {
                        task.wake();
                    }
                }
            }
        }
    }
}

/// Sends what a dropped connection left behind, as fast as the client takes it.
async fn finish(outbox: Arc<Outbox>) {
    let send = poll_fn(|cx| outbox.lock().poll_send(cx));
    if let Ok(Err(error)) = tokio::time::timeout(FINISH_TIMEOUT, send).await {
        tracing::debug!(%error, "sending the end of a closed connection's response failed");
    }
}

impl Out {
    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    fn consumed(&mut self, n: usize) {
        self.sent += n;
        self.total_sent += n as u64;
        if self.sent == self.buf.len() {
            if self.buf.capacity() > KEEP_CAPACITY {
                // An idle keep-alive connection should not hold on to a burst's buffer.
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
            self.sent = 0;
        }
    }

    /// Writes without waiting; `Ok(true)` when nothing is left.
    fn send_now(&mut self) -> io::Result<bool> {
        while self.pending() > 0 {
            match self.socket.try_write(&self.buf[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.consumed(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes everything, waiting for the socket as needed.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending() > 0 {
            let Out {
                socket, buf, sent, ..
            } = self;
            match ready!(Pin::new(socket).poll_write(cx, &buf[*sent..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.consumed(n),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A thread's queue of outboxes with bytes to send, and the task that sends them.
pub(crate) struct Flusher {
    queue: Mutex<Vec<Arc<Outbox>>>,
    task: Mutex<Option<Waker>>,
    /// The task has been woken and not yet run.
    armed: AtomicBool,
    /// The task still exists (its runtime has not dropped it).
    alive: AtomicBool,
}

/// Makes sockets created on this thread batch their writes. For a thread that runs one
/// current-thread runtime for its whole life (a router thread): the flusher started on it
/// belongs to that runtime, and a second runtime on the thread would wait on it in vain.
pub(crate) fn batch_this_thread() {
    BATCHING.with(|b| b.set(true));
}

thread_local! {
    static BATCHING: Cell<bool> = const { Cell::new(false) };
    static FLUSHER: RefCell<Weak<Flusher>> = const { RefCell::new(Weak::new()) };
}

impl Flusher {
    /// This thread's flusher, started on first use; `None` unless [`batch_this_thread`] was
    /// called on it and it runs a current-thread runtime.
    fn for_this_thread() -> Option<Arc<Flusher>> {
        if !BATCHING.with(Cell::get) {
            return None;
        }
        let handle = Handle::try_current().ok()?;
        if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
            return None;
        }
        FLUSHER.with(|slot| {
            if let Some(flusher) = slot.borrow().upgrade()
                && flusher.alive.load(Ordering::Acquire)
            {
                return Some(flusher);
            }
            let flusher = Arc::new(Flusher {
                queue: Mutex::new(Vec::new()),
                task: Mutex::new(None),
                armed: AtomicBool::new(false),
                alive: AtomicBool::new(true),
            });
            handle.spawn(run(Alive(Arc::clone(&flusher))));
            *slot.borrow_mut() = Arc::downgrade(&flusher);
            Some(flusher)
        })
    }

    fn queue(&self, outbox: Arc<Outbox>) {
        lock(&self.queue).push(outbox);
        if !self.armed.swap(true, Ordering::AcqRel)
            && let Some(task) = lock(&self.task).as_ref()
        {
            task.wake_by_ref();
        }
    }
}

/// Marks the flusher dead when its task goes, run or not: a future that was never polled
/// still drops its arguments.
struct Alive(Arc<Flusher>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
        // Dropping the outboxes closes their sockets (they hold the flusher: no cycle left).
        lock(&self.0.queue).clear();
    }
}

/// The flusher's task: each time it runs, it sends every queued outbox.
async fn run(alive: Alive) {
    let flusher = &alive.0;
    let mut batch = Vec::new();
    poll_fn(|cx| {
        {
            let mut task = lock(&flusher.task);
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        flusher.armed.store(false, Ordering::Release);
        std::mem::swap(&mut *lock(&flusher.queue), &mut batch);
        for outbox in batch.drain(..) {
            outbox.flush();
        }
        // The end of a batch is where a thread that holds its core too long lets go.
        crate::yielding::after_batch();
        Poll::<()>::Pending
    })
    .await;
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: (the router's side, wrapped; the peer's side).
    async fn pair(on_drop: OnDrop) -> (Socket, TcpStream) {
        batch_this_thread();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Socket::new(ours.unwrap(), on_drop), theirs.unwrap().0)
    }

    fn nothing_arrived(peer: &TcpStream) -> bool {
        let mut byte = [0_u8; 1];
        matches!(peer.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Waits until the peer's socket has something to read (the bytes crossed loopback).
    async fn arrived(peer: &TcpStream) {
        tokio::time::timeout(Duration::from_secs(5), peer.readable())
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn the_writes_of_several_connections_leave_together_after_the_batch() {
        let (mut a, mut peer_a) = pair(OnDrop::Send).await;
        let (mut b, mut peer_b) = pair(OnDrop::Send).await;
        a.write_all(b"one").await.unwrap();
        a.flush().await.unwrap();
        b.write_all(b"two").await.unwrap();
        b.flush().await.unwrap();
        // This task has not yielded, so the flusher queued behind it has not run.
        std::thread::sleep(Duration::from_millis(20));
        assert!(nothing_arrived(&peer_a) && nothing_arrived(&peer_b));
        tokio::task::yield_now().await;
        let mut got = [0_u8; 3];
        peer_a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one");
        peer_b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"two");
    }

    #[tokio::test]
    async fn a_write_waits_in_the_outbox_until_the_task_yields() {
        let (mut ours, peer) = pair(OnDrop::Send).await;
        ours.write_all(b"hello").await.unwrap();
        ours.flush().await.unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(nothing_arrived(&peer), "sent before the batch ended");
        tokio::task::yield_now().await;
        arrived(&peer).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_multi_thread_runtime_writes_go_straight_out() {
        let (mut ours, peer) = pair(OnDrop::Send).await;
        ours.write_all(b"hello").await.unwrap();
        let mut got = [0_u8; 5];
        // No yield in between: the bytes must already be on the socket.
        let mut read = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while read < got.len() && std::time::Instant::now() < deadline {
            match peer.try_read(&mut got[read..]) {
                Ok(n) => read += n,
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        assert_eq!(&got, b"hello");
    }

    /// More than the socket buffers hold, in writes of many sizes, to a peer that reads
    /// slowly: everything arrives, in order.
    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        let (mut ours, mut peer) = pair(OnDrop::Send).await;
        let total = 8 * 1024 * 1024;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::with_capacity(total);
            let mut chunk = vec![0_u8; 7000];
            loop {
                let n = peer.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&chunk[..n]);
                if got.len() % 3 == 0 {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
            got
        });
        let sizes = [1, 100, 5000, 16 * 1024, 70_000, 3];
        let mut at = 0;
        for size in sizes.iter().cycle() {
            if at == total {
                break;
            }
            let end = (at + size).min(total);
            ours.write_all(&data[at..end]).await.unwrap();
            at = end;
        }
        ours.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived out of order or changed");
    }

    /// A pair whose socket buffers are small, so that a few writes fill them.
    async fn small_pair() -> (Socket, TcpStream) {
        batch_this_thread();
        let listen = tokio::net::TcpSocket::new_v4().unwrap();
        listen.set_recv_buffer_size(4096).unwrap();
        listen.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listen.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = tokio::net::TcpSocket::new_v4().unwrap();
        connect.set_send_buffer_size(4096).unwrap();
        let (ours, theirs) = tokio::join!(connect.connect(addr), listener.accept());
        (Socket::new(ours.unwrap(), OnDrop::Send), theirs.unwrap().0)
    }

    #[tokio::test]
    async fn a_dropped_socket_sends_what_waits_then_closes() {
        let (mut ours, mut peer) = small_pair().await;
        let data: Vec<u8> = (0..1_000_000_u32).map(|i| (i % 253) as u8).collect();
        let expected = data.clone();
        // The peer starts reading late: the writes stall, and what the last flush cannot send
        // outlives the connection, left to a finishing task.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        for piece in data.chunks(1000) {
            ours.write_all(piece).await.unwrap();
        }
        assert!(ours.outbox.lock().pending() > 0);
        drop(ours);
        let got = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .unwrap()
            .unwrap();
        assert!(
            got == expected,
            "got {} of {} bytes",
            got.len(),
            expected.len()
        );
    }

    #[tokio::test]
    async fn an_emptied_outbox_gives_back_a_large_buffer() {
        let (mut ours, mut peer) = small_pair().await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        for _ in 0..100 {
            ours.write_all(&[5_u8; 1000]).await.unwrap();
        }
        // A flush waits for the socket only once a batch could not send everything, so
        // flush, let the batch end, and again, until nothing waits.
        while ours.outbox.lock().pending() > 0 {
            ours.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        assert!(ours.outbox.lock().buf.capacity() <= KEEP_CAPACITY);
        ours.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), 100_000);
    }

    #[tokio::test]
    async fn a_discarding_socket_dropped_before_the_flush_sends_nothing() {
        let (mut ours, mut peer) = pair(OnDrop::Discard).await;
        ours.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(ours.bytes_sent(), 0);
        drop(ours);
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), peer.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got.is_empty(), "a discarded request was sent: {got:?}");
    }

    #[tokio::test]
    async fn send_waiting_puts_the_bytes_on_the_socket_now() {
        let (mut ours, peer) = pair(OnDrop::Discard).await;
        ours.write_all(b"head").await.unwrap();
        ours.send_waiting().await.unwrap();
        assert_eq!(ours.bytes_sent(), 4);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!nothing_arrived(&peer));
    }

    #[tokio::test]
    async fn a_send_that_fails_does_not_hide_what_the_peer_answered() {
        let (mut ours, mut peer) = small_pair().await;
        // Writes until a batch leaves bytes behind: the socket is full, the peer reads nothing.
        while !ours.outbox.stalled.load(Ordering::Acquire) {
            ours.write_all(&[7_u8; 1000]).await.unwrap();
            tokio::task::yield_now().await;
        }
        // The peer answers without reading, then closes: the unread bytes make that a reset.
        peer.write_all(b"answer").await.unwrap();
        drop(peer);
        let reset = ours
            .read
            .as_ref()
            .unwrap()
            .ready(tokio::io::Interest::ERROR);
        tokio::time::timeout(Duration::from_secs(5), reset)
            .await
            .unwrap()
            .unwrap();
        let mut got = [0_u8; 16];
        let n = ours.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"answer");
        assert!(ours.write_all(b"more").await.is_err());
    }

    /// A client socket, its peer, and the flag that says a request with a body came.
    async fn client_pair(sent_body: bool) -> (Socket, TcpStream) {
        let (ours, theirs) = pair(OnDrop::Send).await;
        let mut ours = ours;
        ours.sent_body = Some(Arc::new(AtomicBool::new(sent_body)));
        (ours, theirs)
    }

    /// After reading the answer and the end of the stream, writes up to 16 MiB (more than
    /// socket buffers hold, so the other side must be reading): how far it got.
    async fn write_after_the_answer(peer: &mut TcpStream) -> Result<(), io::Error> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), peer.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"answer");
        let chunk = vec![0_u8; 64 * 1024];
        for _ in 0..256 {
            tokio::time::timeout(Duration::from_secs(5), peer.write_all(&chunk))
                .await
                .unwrap()?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_client_that_sent_a_body_gets_a_lingering_close() {
        // Everything the client sent so far was read: only the flag tells it may send more.
        let (mut ours, mut peer) = client_pair(true).await;
        ours.write_all(b"answer").await.unwrap();
        drop(ours);
        write_after_the_answer(&mut peer).await.unwrap();

        // Without a body under way the socket closes at once, and more bytes reset it.
        let (mut ours, mut peer) = client_pair(false).await;
        ours.write_all(b"answer").await.unwrap();
        drop(ours);
        assert!(write_after_the_answer(&mut peer).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_socket_closes_once_its_client_goes_quiet() {
        let (mut ours, mut peer) = client_pair(true).await;
        ours.write_all(b"answer").await.unwrap();
        drop(ours);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer");
        // The paused clock jumps to the linger's idle deadline while nothing else happens.
        tokio::time::sleep(LINGER_IDLE + Duration::from_secs(1)).await;
        assert!(write_after_the_answer_raw(&mut peer).await.is_err());
    }

    /// Writes up to 16 MiB: an error once the other side has closed.
    async fn write_after_the_answer_raw(peer: &mut TcpStream) -> Result<(), io::Error> {
        let chunk = vec![0_u8; 64 * 1024];
        for _ in 0..256 {
            peer.write_all(&chunk).await?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_flush_to_a_reset_connection_fails_the_next_write() {
        let (mut ours, peer) = pair(OnDrop::Send).await;
        // Close with unread bytes pending on the peer: it answers with a reset.
        drop(peer);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut failed = false;
        for _ in 0..50 {
            if ours.write_all(&[1_u8; 1000]).await.is_err() || ours.flush().await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(failed, "writes to a closed connection kept succeeding");
    }
}
