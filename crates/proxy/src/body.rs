//! The bodies the router streams: client request bodies on their way upstream
//! ([`UpstreamBody`], which enforces the body size limit as bytes pass), and responses on their
//! way to the client (`ProxyBody`, which keeps the request counted against its instance until
//! the last byte, and returns the upstream connection to the pool as soon as the instance's
//! response has been read to its end).
//!
//! Neither buffers: each frame is handed on as it arrives.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::instance::InFlight;
use crate::upstream::{Connection, ResponseBodyError, ResponseFraming, ResponseReader};

/// Why a request body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestBodyError {
    /// The client sent more than the app's `max_body_bytes`.
    #[error("request body exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The client's stream failed.
    #[error("reading the request body: {0}")]
    Client(#[from] hyper::Error),
}

/// A request body sent to an instance.
pub(crate) struct UpstreamBody {
    inner: Incoming,
    seen: u64,
    limit: u64,
}

impl UpstreamBody {
    pub(crate) fn streamed(inner: Incoming, limit: Option<u64>) -> UpstreamBody {
        UpstreamBody {
            inner,
            seen: 0,
            limit: limit.unwrap_or(u64::MAX),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge {
                            limit: this.limit,
                        })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body sent to a client.
pub(crate) enum ProxyBody {
    /// A short body the router wrote itself (errors, 404s).
    Local(Option<Bytes>),
    /// An instance's response body that arrived whole with its head (the connection is
    /// already back in the pool); the request stays counted until the client has it.
    Whole {
        data: Option<Bytes>,
        in_flight: Option<InFlight>,
    },
    /// An instance's response, streamed.
    Upstream(Upstream),
}

/// An instance's response body with what it holds until the end.
pub(crate) struct Upstream {
    reader: Option<ResponseReader>,
    /// Counts the request against the instance until the body ends or is dropped.
    in_flight: Option<InFlight>,
}

impl Upstream {
    /// Returns the connection to the pool if the body ended cleanly, and stops counting the
    /// request.
    fn finish(&mut self) {
        if let (Some(reader), Some(in_flight)) = (self.reader.take(), self.in_flight.as_ref())
            && let Some(conn) = reader.into_reusable()
        {
            in_flight.instance().release(conn);
        }
        self.in_flight = None;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // hyper stops polling a body that reports its end, so a body dropped after its last
        // frame has still ended cleanly and its connection can be reused.
        if self.reader.as_ref().is_some_and(ResponseReader::is_end) {
            self.finish();
        }
    }
}

impl ProxyBody {
    pub(crate) fn local(text: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Local(Some(text.into()))
    }

    pub(crate) fn empty() -> ProxyBody {
        ProxyBody::Local(None)
    }

    /// The body of a response whose head was read from `conn`.
    pub(crate) fn upstream(
        conn: Connection,
        framing: ResponseFraming,
        keep_alive: bool,
        in_flight: InFlight,
    ) -> ProxyBody {
        let release = |conn: Connection| in_flight.instance().release(conn);
        match ResponseReader::new(conn, framing, keep_alive) {
            // No body: the exchange is over.
            Err(conn) => {
                if keep_alive && !conn.has_unread() {
                    release(conn);
                }
                ProxyBody::empty()
            }
            Ok(reader) if reader.is_whole() => {
                let (data, conn) = reader.into_whole();
                if let Some(conn) = conn {
                    release(conn);
                }
                ProxyBody::Whole {
                    data: Some(data),
                    in_flight: Some(in_flight),
                }
            }
            Ok(reader) => ProxyBody::Upstream(Upstream {
                reader: Some(reader),
                in_flight: Some(in_flight),
            }),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        match self.get_mut() {
            ProxyBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Whole { data, in_flight } => {
                *in_flight = None;
                Poll::Ready(data.take().map(|b| Ok(Frame::data(b))))
            }
            ProxyBody::Upstream(up) => {
                let Some(reader) = up.reader.as_mut() else {
                    return Poll::Ready(None);
                };
                let polled = reader.poll_frame(cx);
                match &polled {
                    // The last frame: the connection goes back now, not when hyper drops
                    // the body.
                    Poll::Ready(Some(Ok(_)) | None) if reader.is_end() => up.finish(),
                    // A failed stream leaves the connection in an unknown state: it is
                    // dropped with the reader, not pooled.
                    Poll::Ready(Some(Err(_))) => {
                        up.reader = None;
                        up.in_flight = None;
                    }
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(bytes) | ProxyBody::Whole { data: bytes, .. } => bytes.is_none(),
            ProxyBody::Upstream(up) => up.reader.as_ref().is_none_or(ResponseReader::is_end),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(None) | ProxyBody::Whole { data: None, .. } => SizeHint::with_exact(0),
            ProxyBody::Local(Some(b)) | ProxyBody::Whole { data: Some(b), .. } => {
                SizeHint::with_exact(b.len() as u64)
            }
            ProxyBody::Upstream(up) => match up.reader.as_ref().and_then(ResponseReader::exact_len)
            {
                Some(n) => SizeHint::with_exact(n),
                None if up.reader.is_none() => SizeHint::with_exact(0),
                None => SizeHint::default(),
            },
        }
    }
}
