//! The router's side of an HTTP/1.1 connection to an instance: writing a request, reading the
//! response head, and decoding the response body's framing as the body streams to the client.
//!
//! A [`Connection`] is driven by the request that uses it, from that request's own task: no
//! connection task, no channel between a request and its connection, no per-request timer
//! registration. That was most of what the router paid per request over nginx when it used
//! hyper's client (a task wake-up and a channel hop each way per exchange; see the router's
//! section of ARCHITECTURE.md). The wire format is parsed by `httparse` (what hyper uses); this
//! module only frames messages.
//!
//! **Invariant:** a connection goes back to the pool only between messages: after a response
//! whose body was read to its end, on a connection that both sides keep alive and that holds no
//! unread byte. Anything else (an error, a timeout, a body the client stopped reading, an
//! upstream that closes) drops the connection, which closes it.
//!
//! It does not know about instances, routes or retries: it reports what happened to one
//! exchange ([`ExchangeError`]) and `forward` decides.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::batch::{OnDrop, Socket};
use crate::body::{RequestBodyError, UpstreamBody};

/// Bytes a read asks the socket for at least (the buffer grows to this when it has less room).
const READ_CHUNK: usize = 8 * 1024;

/// Room below which the read buffer is grown before the next read.
const MIN_READ_ROOM: usize = 1024;

/// The largest response head (or chunk-size line and trailers) accepted from an instance.
const MAX_HEAD_BYTES: usize = 256 * 1024;

/// The most header fields accepted in one response head or trailer section.
const MAX_HEADERS: usize = 100;

/// A keep-alive HTTP/1.1 connection to an instance.
pub(crate) struct Connection {
    /// Requests wait in the socket's outbox and leave with the thread's batch (see `batch`).
    /// A request still waiting when the connection is dropped is thrown away, never sent.
    io: Socket,
    /// Bytes read from the instance and not yet handed on.
    buf: BytesMut,
    /// The request timeout of the exchange in progress. One timer lives as long as the
    /// connection and is moved forward for each request: moving a registered timer later is an
    /// atomic store, where a fresh timer per request costs a registration and a removal in the
    /// runtime's timer wheel.
    timer: Pin<Box<Sleep>>,
    /// Scratch space for a response head's field offsets, kept between responses.
    offsets: Vec<FieldAt>,
    /// Whether the connection has carried an exchange before (it came from the pool).
    reused: bool,
}

/// Where one header field of a response head lies in it: name offset and length, value
/// offset and length.
type FieldAt = (usize, usize, usize, usize);

/// How one exchange on a connection failed.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// No byte of the request reached the connection: the request may go anywhere else.
    Unsent,
    /// The connection failed after the request was (partly) written and before any byte of a
    /// response arrived.
    Reset,
    /// The instance answered something that is not a usable HTTP/1.1 response, or broke off in
    /// the middle of its response head.
    Invalid,
    /// No response head before the request's deadline.
    Timeout,
    /// The client's request body failed or grew past the limit.
    Body(RequestBodyError),
}

/// How a request body is framed on the wire to the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// No body.
    Empty,
    /// This many bytes, as they are (`Content-Length`).
    Length(u64),
    /// `Transfer-Encoding: chunked` is in the head.
    Chunked,
}

/// How a response body is framed, as its head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    /// No body (a `HEAD` request, 204, 304, or a zero length).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the instance closes the connection.
    Close,
    /// 101: the connection becomes a tunnel.
    Upgrade,
}

/// A response head from an instance.
pub(crate) struct Answer {
    /// The status and the end-to-end headers (hop-by-hop ones are already left out).
    pub(crate) response: Response<()>,
    pub(crate) framing: ResponseFraming,
    /// Whether the connection may carry another request once the body has been read.
    pub(crate) keep_alive: bool,
}

impl Connection {
    /// Connects to `addr`, giving up at `deadline`. `None` when the connection could not be
    /// made (nothing was sent); `Err` when the deadline passed.
    pub(crate) async fn open(
        addr: std::net::SocketAddr,
        deadline: Instant,
    ) -> Result<Option<Connection>, ExchangeError> {
        let connect = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(connect) => connect,
            Err(_) => return Err(ExchangeError::Timeout),
        };
        let io = match connect {
            Ok(io) => io,
            Err(error) => {
                tracing::debug!(instance = %addr, %error, "connect failed");
                return Ok(None);
            }
        };
        // Small requests and responses must not wait for Nagle's algorithm.
        let _ = io.set_nodelay(true);
        Ok(Some(Connection {
            io: Socket::new(io, OnDrop::Discard),
            buf: BytesMut::with_capacity(READ_CHUNK),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            offsets: Vec::new(),
            reused: false,
        }))
    }

    /// Whether an idle connection is still open and quiet. Costs no system call unless the
    /// runtime has seen the socket become readable since its last response: an idle
    /// connection should send nothing, so anything readable is the instance closing it (or
    /// junk), and the connection is not reused.
    pub(crate) fn is_reusable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0_u8; 1];
        // Pending without a system call unless the socket has been readable since; then one
        // peek, as `probe_open` would.
        self.io
            .poll_peek(&mut cx, &mut ReadBuf::new(&mut byte))
            .is_pending()
    }

    /// Whether the instance has not closed this idle connection, asking the socket itself (one
    /// system call). For requests that cannot be replayed once sent, this narrows the window
    /// in which an idle connection the instance just closed would lose them.
    pub(crate) fn probe_open(&mut self) -> bool {
        let mut byte = [0_u8; 1];
        match self.io.try_read(&mut byte) {
            Err(error) => error.kind() == std::io::ErrorKind::WouldBlock,
            // End of stream, or bytes nobody asked for.
            Ok(_) => false,
        }
    }

    /// Sends a request (its encoded head, then its body) and reads the response head, all
    /// before `deadline`. The body is taken only once the head is on the connection, so after
    /// [`ExchangeError::Unsent`] it is still there to send elsewhere.
    pub(crate) async fn exchange(
        &mut self,
        head: &[u8],
        body: &mut Option<(UpstreamBody, RequestFraming)>,
        head_request: bool,
        deadline: Instant,
    ) -> Result<Answer, ExchangeError> {
        let Connection {
            io,
            buf,
            timer,
            offsets,
            ..
        } = self;
        timer.as_mut().reset(deadline);
        let before = io.bytes_sent();
        let had_body = body.is_some();
        let exchange = async {
            write_head(io, head).await?;
            if body.is_some() {
                // The body is taken only once the head has left (not merely reached the
                // outbox), so after `Unsent` it is still there to send elsewhere.
                io.send_waiting().await.map_err(|_| ExchangeError::Reset)?;
            }
            let Some((body, framing)) = body.take() else {
                return read_head(io, buf, offsets, head_request).await;
            };
            // The body goes up while the answer is awaited: an instance may answer before it
            // has read the whole body (a 413, a 401) and then stop reading it.
            let (mut reader, mut writer) = io.split();
            let sending = write_body(&mut writer, body, framing);
            let answer = read_head(&mut reader, buf, offsets, head_request);
            tokio::pin!(sending, answer);
            let sent = tokio::select! {
                biased;
                sent = &mut sending => sent,
                answer = &mut answer => {
                    // Answered before the body was all sent: the connection is mid-message.
                    return answer.map(|answer| Answer {
                        keep_alive: false,
                        ..answer
                    });
                }
            };
            match sent {
                Ok(()) => answer.await,
                // The instance stopped taking the body; it may have answered first.
                Err(ExchangeError::Reset) => match answer.await {
                    Ok(answer) => Ok(Answer {
                        keep_alive: false,
                        ..answer
                    }),
                    Err(_) => Err(ExchangeError::Reset),
                },
                Err(error) => Err(error),
            }
        };
        let result = tokio::select! {
            biased;
            result = exchange => result,
            () = timer.as_mut() => Err(ExchangeError::Timeout),
        };
        match result {
            // The connection failed before the thread's batch sent the request: no byte of it
            // left, and the discard makes sure none will.
            Err(ExchangeError::Reset)
                if (!had_body || body.is_some()) && io.discard_if_unsent(before) =>
            {
                Err(ExchangeError::Unsent)
            }
            result => result,
        }
    }

    /// Whether the connection carried an exchange before this one.
    pub(crate) fn is_reused(&self) -> bool {
        self.reused
    }

    /// Marks the connection as one that goes back to the pool.
    pub(crate) fn set_reused(&mut self) {
        self.reused = true;
    }

    /// Whether bytes past the last response are waiting in the buffer (a connection with any
    /// is not reused).
    pub(crate) fn has_unread(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The socket and any bytes already read past the response head, for an upgraded tunnel.
    pub(crate) fn into_parts(self) -> (Socket, BytesMut) {
        // The exchange is over: what the tunnel writes must reach the instance even if the
        // tunnel then ends, as it would on a plain socket.
        self.io.set_on_drop(OnDrop::Send);
        (self.io, self.buf)
    }

    /// Reads more bytes into the buffer; `Ready(Ok(0))` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        make_room(&mut self.buf);
        // `read_buf` is cancel-safe (bytes are only taken when it is ready), so a fresh one can
        // be polled each time.
        let read = self.io.read_buf(&mut self.buf);
        std::pin::pin!(read).poll(cx)
    }
}

fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_READ_ROOM {
        // Reclaims the buffer in place when nothing else holds a slice of it.
        buf.reserve(READ_CHUNK);
    }
}

/// Writes the request head (into the socket's outbox, as a rule). A failure is a `Reset`;
/// [`Connection::exchange`] tells an unsent request from it by the bytes the socket sent.
async fn write_head(io: &mut Socket, head: &[u8]) -> Result<(), ExchangeError> {
    io.write_all(head).await.map_err(|_| ExchangeError::Reset)
}

/// Streams the request body, framed as its head said.
async fn write_body<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut body: UpstreamBody,
    framing: RequestFraming,
) -> Result<(), ExchangeError> {
    let sent = |result: std::io::Result<()>| result.map_err(|_| ExchangeError::Reset);
    let chunked = framing == RequestFraming::Chunked;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ExchangeError::Body)?;
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) if chunked => {
                let size = format!("{:x}\r\n", data.len());
                let mut chunk = Buf::chain(size.as_bytes(), data).chain(&b"\r\n"[..]);
                sent(io.write_all_buf(&mut chunk).await)?;
            }
            Ok(mut data) => sent(io.write_all_buf(&mut data).await)?,
            Err(frame) => {
                if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                    let mut last = b"0\r\n".to_vec();
                    for (name, value) in &trailers {
                        push_header(&mut last, name.as_str().as_bytes(), value.as_bytes());
                    }
                    last.extend_from_slice(b"\r\n");
                    sent(io.write_all(&last).await)?;
                    return Ok(());
                }
            }
        }
    }
    if chunked {
        sent(io.write_all(b"0\r\n\r\n").await)?;
    }
    Ok(())
}

/// Appends `name: value\r\n`.
pub(crate) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Reads until a final (non-1xx, or 101) response head is complete and parses it.
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    offsets: &mut Vec<FieldAt>,
    head_request: bool,
) -> Result<Answer, ExchangeError> {
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            answered = true;
            if let Some(answer) = parse_head(buf, offsets, head_request)? {
                return Ok(answer);
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Err(ExchangeError::Invalid);
            }
        }
        make_room(buf);
        match io.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            // The connection ended or broke before a response head was complete.
            Ok(_) | Err(_) if answered => return Err(ExchangeError::Invalid),
            Ok(_) | Err(_) => return Err(ExchangeError::Reset),
        }
    }
}

/// Parses a response head at the start of `buf`, consuming it. `Ok(None)` when more bytes are
/// needed; informational (1xx) heads other than 101 are consumed and skipped.
fn parse_head(
    buf: &mut BytesMut,
    offsets: &mut Vec<FieldAt>,
    head_request: bool,
) -> Result<Option<Answer>, ExchangeError> {
    loop {
        // Uninitialised slots: the parser fills only as many as the head has.
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ExchangeError::Invalid),
        };
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| ExchangeError::Invalid)?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        let http10 = parsed.version == Some(0);
        // Header values become slices of the head's bytes (one shared buffer, no copies);
        // the fields are first noted as offsets, since the parse borrows the buffer.
        let base = buf.as_ptr() as usize;
        offsets.clear();
        offsets.extend(parsed.headers.iter().map(|field| {
            (
                field.name.as_ptr() as usize - base,
                field.name.len(),
                field.value.as_ptr() as usize - base,
                field.value.len(),
            )
        }));
        let head = buf.split_to(len).freeze();
        return build_answer(&head, offsets, status, http10, head_request).map(Some);
    }
}

fn build_answer(
    head: &Bytes,
    fields: &[FieldAt],
    status: StatusCode,
    http10: bool,
    head_request: bool,
) -> Result<Answer, ExchangeError> {
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut close = http10;
    let mut keep_alive_token = false;
    let mut names_others = false;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    // One pass: each name is parsed once (a known name becomes a constant that compares as
    // an integer), the framing and connection headers are read, the rest kept.
    let mut headers = HeaderMap::with_capacity(fields.len());
    for &(name_at, name_len, value_at, value_len) in fields {
        let name = head.get(name_at..name_at + name_len).unwrap_or_default();
        let name = HeaderName::from_bytes(name).map_err(|_| ExchangeError::Invalid)?;
        let value = head.get(value_at..value_at + value_len).unwrap_or_default();
        if name == header::CONTENT_LENGTH {
            // `1*DIGIT` (RFC 9110 §8.6): Rust's parse would also take a sign.
            let digits = value.trim_ascii();
            let n = std::str::from_utf8(digits)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(ExchangeError::Invalid)?;
            if length.is_some_and(|l| l != n) {
                return Err(ExchangeError::Invalid);
            }
            length = Some(n);
        } else if name == header::CONNECTION {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_token = true;
                } else if !token.is_empty() {
                    names_others = true;
                }
            }
            if !upgrade {
                continue;
            }
        } else if name == header::TRANSFER_ENCODING {
            // Only `chunked` is taken off and framed anew: another coding would reach the
            // client undecoded and unlabelled, so it is refused (nginx: 502).
            let codings = value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
            if chunked
                || !codings.clone().all(|c| c.eq_ignore_ascii_case(b"chunked"))
                || codings.count() != 1
            {
                return Err(ExchangeError::Invalid);
            }
            chunked = true;
            continue;
        } else if is_hop_by_hop(&name, upgrade) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
            .map_err(|_| ExchangeError::Invalid)?;
        headers.append(name, value);
    }
    if chunked {
        // A chunked body reaches the client framed anew; its length is not this one.
        headers.remove(header::CONTENT_LENGTH);
        // Both framings: chunked wins, and the connection is not trusted with another
        // exchange (RFC 9112 §6.3: a sign of smuggling or splitting).
        close |= length.is_some();
    }
    // Every header `Connection` names describes this connection only (rare: look again). A
    // 101's `Connection: upgrade` names the `Upgrade` header the client needs.
    if names_others && !upgrade {
        for value in fields
            .iter()
            .filter_map(|&(name_at, name_len, value_at, value_len)| {
                let name = head.get(name_at..name_at + name_len)?;
                name.eq_ignore_ascii_case(b"connection")
                    .then(|| head.get(value_at..value_at + value_len))
                    .flatten()
            })
        {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if let Ok(token) = std::str::from_utf8(token) {
                    headers.remove(token);
                }
            }
        }
    }
    if http10 && keep_alive_token {
        close = false;
    }
    let no_body =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if upgrade {
        ResponseFraming::Upgrade
    } else if no_body {
        ResponseFraming::Empty
    } else {
        match (chunked, length) {
            (true, _) => ResponseFraming::Chunked,
            (false, None) => ResponseFraming::Close,
            (false, Some(0)) => ResponseFraming::Empty,
            (false, Some(n)) => ResponseFraming::Length(n),
        }
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(Answer {
        response,
        framing,
        keep_alive: !close && !matches!(framing, ResponseFraming::Close | ResponseFraming::Upgrade),
    })
}

/// The headers that describe one connection rather than the message (RFC 9110 §7.6.1),
/// besides `Connection`, `Transfer-Encoding` and those `Connection` names. A 101 keeps
/// `Upgrade`: the client needs it to take the switch.
fn is_hop_by_hop(name: &HeaderName, upgrade: bool) -> bool {
    name == header::TE
        || name == header::TRAILER
        || (name == header::UPGRADE && !upgrade)
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// Where a response body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// This many bytes of a `Content-Length` body are left.
    Length(u64),
    /// At a chunk-size line.
    ChunkSize,
    /// This many bytes of the current chunk are left.
    ChunkData(u64),
    /// At the CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: optional trailer fields, then an empty line.
    Trailers,
    /// Until the instance closes the connection.
    Close,
    /// The body ended where its framing said.
    Done,
    /// The body broke off; the connection is not reused.
    Failed,
}

/// Why a response body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResponseBodyError {
    /// The connection broke or ended before the body did.
    #[error("the instance's connection ended in the middle of a response body")]
    Cut,
    /// The body's framing is not valid HTTP/1.1.
    #[error("the instance sent a malformed response body")]
    Malformed,
}

/// A response body read from its connection as the client takes it.
pub(crate) struct ResponseReader {
    conn: Connection,
    decode: Decode,
    keep_alive: bool,
}

impl ResponseReader {
    /// A reader for a body of `framing`; `Err` gives the connection back for a framing with
    /// nothing to read (no body, or an upgrade).
    pub(crate) fn new(
        conn: Connection,
        framing: ResponseFraming,
        keep_alive: bool,
    ) -> Result<ResponseReader, Connection> {
        let decode = match framing {
            ResponseFraming::Length(n) => Decode::Length(n),
            ResponseFraming::Chunked => Decode::ChunkSize,
            ResponseFraming::Close => Decode::Close,
            ResponseFraming::Empty | ResponseFraming::Upgrade => return Err(conn),
        };
        Ok(ResponseReader {
            conn,
            decode,
            keep_alive,
        })
    }

    /// Whether the body is a `Content-Length` body that arrived whole with its head (the
    /// common small response).
    pub(crate) fn is_whole(&self) -> bool {
        matches!(self.decode, Decode::Length(n) if n <= self.conn.buf.len() as u64)
    }

    /// The whole body, and the connection if it can be reused. Only for a reader that
    /// [`ResponseReader::is_whole`]; any other gives an empty body and drops the connection.
    pub(crate) fn into_whole(self) -> (Bytes, Option<Connection>) {
        let ResponseReader {
            mut conn,
            decode,
            keep_alive,
        } = self;
        let whole = match decode {
            Decode::Length(n) => usize::try_from(n).ok().filter(|&n| n <= conn.buf.len()),
            _ => None,
        };
        let Some(n) = whole else {
            return (Bytes::new(), None);
        };
        let data = conn.buf.split_to(n).freeze();
        let reusable = keep_alive && conn.buf.is_empty();
        (data, reusable.then_some(conn))
    }

    /// Whether the body has been read to its end (or failed): nothing more will come.
    pub(crate) fn is_end(&self) -> bool {
        matches!(self.decode, Decode::Done | Decode::Failed)
    }

    /// The exact number of body bytes left, when the framing says.
    pub(crate) fn exact_len(&self) -> Option<u64> {
        match self.decode {
            Decode::Length(n) => Some(n),
            Decode::Done => Some(0),
            _ => None,
        }
    }

    /// The connection, when the body was read cleanly to its end and both sides keep it
    /// alive with no stray byte in it.
    pub(crate) fn into_reusable(self) -> Option<Connection> {
        (self.decode == Decode::Done && self.keep_alive && self.conn.buf.is_empty())
            .then_some(self.conn)
    }

    fn fail(
        &mut self,
        error: ResponseBodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        self.decode = Decode::Failed;
        Poll::Ready(Some(Err(error)))
    }

    /// The next frame of the body; `None` at its end.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        loop {
            let buf = &mut self.conn.buf;
            match self.decode {
                Decode::Done | Decode::Failed => return Poll::Ready(None),
                Decode::Length(0) => {
                    self.decode = Decode::Done;
                    return Poll::Ready(None);
                }
                Decode::Length(left) | Decode::ChunkData(left) if !buf.is_empty() => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.decode = match self.decode {
                        Decode::ChunkData(_) if left == 0 => Decode::ChunkEnd,
                        Decode::ChunkData(_) => Decode::ChunkData(left),
                        // The last bytes end the body now, so the connection can go back to
                        // the pool before the client has them.
                        _ if left == 0 => Decode::Done,
                        _ => Decode::Length(left),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Close if !buf.is_empty() => {
                    let data = buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::ChunkSize if !buf.is_empty() => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.decode = if size == 0 {
                            Decode::Trailers
                        } else {
                            Decode::ChunkData(size)
                        };
                        continue;
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {}
                    _ => return self.fail(ResponseBodyError::Malformed),
                },
                Decode::ChunkEnd if buf.len() >= 2 => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.decode = Decode::ChunkSize;
                        continue;
                    }
                    return self.fail(ResponseBodyError::Malformed);
                }
                Decode::Trailers if buf.starts_with(b"\r\n") => {
                    buf.advance(2);
                    self.decode = Decode::Done;
                    return Poll::Ready(None);
                }
                Decode::Trailers if buf.len() >= 2 => match parse_trailers(buf) {
                    Ok(Some(trailers)) => {
                        self.decode = Decode::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(None) if buf.len() < MAX_HEAD_BYTES => {}
                    _ => return self.fail(ResponseBodyError::Malformed),
                },
                _ => {}
            }
            // More bytes are needed.
            match self.conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(Ok(_)) if self.decode == Decode::Close => {
                    self.keep_alive = false;
                    self.decode = Decode::Done;
                    return Poll::Ready(None);
                }
                Poll::Ready(_) => return self.fail(ResponseBodyError::Cut),
            }
        }
    }
}

/// Parses a trailer section (fields then an empty line) at the start of `buf`, consuming it.
fn parse_trailers(buf: &mut BytesMut) -> Result<Option<HeaderMap>, ResponseBodyError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (len, fields) = match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(parsed)) => parsed,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ResponseBodyError::Malformed),
    };
    let mut trailers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        // Trailers are rare and small: copying them is simpler than slicing the buffer.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Err(ResponseBodyError::Malformed);
        };
        trailers.append(name, value);
    }
    buf.advance(len);
    Ok(Some(trailers))
}

/// The request head line and the headers every request carries are written by `forward`; this
/// only says which framing header a body needs.
pub(crate) fn request_framing(headers: &HeaderMap, body: &UpstreamBody) -> RequestFraming {
    if body.is_end_stream() {
        return RequestFraming::Empty;
    }
    // hyper has checked the client's `Content-Length` (its lines agree, digits only).
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match length {
        Some(n) => RequestFraming::Length(n),
        None => RequestFraming::Chunked,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn answer(head: &str, head_request: bool) -> Result<Option<Answer>, ExchangeError> {
        let mut buf = BytesMut::from(head.as_bytes());
        parse_head(&mut buf, &mut Vec::new(), head_request)
    }

    /// The header names kept, sorted (a map's order across names means nothing).
    fn names(answer: &Answer) -> Vec<&str> {
        let mut names: Vec<&str> = answer
            .response
            .headers()
            .keys()
            .map(HeaderName::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn a_content_length_response_keeps_its_end_to_end_headers() {
        let a = answer(
            "HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 6\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nhello\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.response.status(), StatusCode::OK);
        assert_eq!(a.framing, ResponseFraming::Length(6));
        assert!(a.keep_alive);
        assert_eq!(names(&a), ["content-length", "server"]);
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert!(
            answer("HTTP/1.1 200 OK\r\nContent-Len", false)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn framing_follows_the_head() {
        for (head, head_request, want, keep_alive) in [
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                ResponseFraming::Chunked,
                true,
            ),
            // Both framings: chunked wins, and the connection is not trusted again (RFC 9112
            // §6.3: a sign of smuggling).
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false,
                ResponseFraming::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n",
                false,
                ResponseFraming::Close,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                true,
                ResponseFraming::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                ResponseFraming::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                false,
                ResponseFraming::Empty,
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
                false,
                ResponseFraming::Length(2),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: Keep-Alive\r\n\r\n",
                false,
                ResponseFraming::Length(2),
                true,
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
                false,
                ResponseFraming::Upgrade,
                false,
            ),
        ] {
            let a = answer(head, head_request).unwrap().unwrap();
            assert_eq!((a.framing, a.keep_alive), (want, keep_alive), "{head:?}");
        }
    }

    #[test]
    fn heads_with_framing_the_router_cannot_pass_on_are_refused() {
        for head in [
            // A coding other than chunked would reach the client undecoded and unlabelled.
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            // `1*DIGIT` only.
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        ] {
            assert!(
                matches!(answer(head, false), Err(ExchangeError::Invalid)),
                "{head:?}"
            );
        }
    }

    #[test]
    fn informational_heads_are_skipped_and_101_keeps_its_upgrade_headers() {
        let a = answer(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.response.status(), StatusCode::CREATED);
        let a = answer(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(names(&a), ["connection", "upgrade"]);
    }

    /// An instance on a real socket that answers one request with `reply`, written in
    /// `pieces` (separate writes, so the router reads them as they come), then keeps the
    /// connection open.
    async fn exchange_with(pieces: &'static [&'static [u8]]) -> (Answer, Connection) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0_u8; 1024];
            let _ = stream.read(&mut buf).await.unwrap();
            for piece in pieces {
                stream.write_all(piece).await.unwrap();
                stream.flush().await.unwrap();
                // Not a wait for anything: a pause so that the pieces usually reach the router
                // as separate reads (the test holds whether they do or not).
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            std::future::pending::<()>().await;
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut conn = Connection::open(addr, deadline).await.unwrap().unwrap();
        let answer = conn
            .exchange(
                b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
                &mut None,
                false,
                deadline,
            )
            .await
            .unwrap();
        (answer, conn)
    }

    async fn read_all(reader: &mut ResponseReader) -> (Vec<u8>, Option<HeaderMap>) {
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = std::future::poll_fn(|cx| reader.poll_frame(cx)).await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn a_chunked_body_split_across_reads_is_decoded_with_its_trailers() {
        let (answer, conn) = exchange_with(&[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n6;ext=1\r\n world\r",
            b"\n0\r\nx-check: 42\r\n",
            b"\r\n",
        ])
        .await;
        assert_eq!(answer.framing, ResponseFraming::Chunked);
        let mut reader = ResponseReader::new(conn, answer.framing, answer.keep_alive)
            .ok()
            .unwrap();
        let (data, trailers) = read_all(&mut reader).await;
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.unwrap()["x-check"], "42");
        assert!(reader.is_end());
        assert!(
            reader.into_reusable().is_some(),
            "a clean end keeps the connection"
        );
    }

    #[tokio::test]
    async fn a_length_body_that_arrives_late_is_streamed_and_the_connection_kept() {
        let (answer, conn) = exchange_with(&[
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123",
            b"456789",
        ])
        .await;
        let mut reader = ResponseReader::new(conn, answer.framing, answer.keep_alive)
            .ok()
            .unwrap();
        assert!(!reader.is_whole());
        let (data, _) = read_all(&mut reader).await;
        assert_eq!(data, b"0123456789");
        assert!(reader.into_reusable().is_some());
    }

    #[tokio::test]
    async fn a_malformed_chunk_fails_the_body_and_drops_the_connection() {
        let (answer, conn) =
            exchange_with(&[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY"])
                .await;
        let mut reader = ResponseReader::new(conn, answer.framing, answer.keep_alive)
            .ok()
            .unwrap();
        let first = std::future::poll_fn(|cx| reader.poll_frame(cx)).await;
        assert_eq!(&first.unwrap().unwrap().into_data().unwrap()[..], b"abc");
        let second = std::future::poll_fn(|cx| reader.poll_frame(cx)).await;
        assert!(matches!(second, Some(Err(ResponseBodyError::Malformed))));
        assert!(reader.into_reusable().is_none());
    }

    #[test]
    fn headers_named_by_connection_and_conflicting_lengths() {
        let a = answer(
            "HTTP/1.1 200 OK\r\nConnection: x-private\r\nX-Private: 1\r\nX-Kept: 2\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(names(&a), ["content-length", "x-kept"]);
        assert!(matches!(
            answer(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            ),
            Err(ExchangeError::Invalid)
        ));
        assert!(matches!(
            answer("SSH-2.0-OpenSSH\r\n\r\n", false),
            Err(ExchangeError::Invalid)
        ));
    }
}
