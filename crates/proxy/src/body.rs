//! The bodies the router streams: client request bodies on their way upstream
//! ([`UpstreamBody`], which enforces the body size limit as bytes pass), and responses on their
//! way to the client (`ProxyBody`, which keeps the request counted against its instance until
//! the last byte, then returns the upstream connection to the pool).
//!
//! Neither buffers: each frame is handed on as it arrives.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::instance::{InFlight, Sender};

/// Why a request body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestBodyError {
    /// The client sent more than the listener's `max_body_bytes`.
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
pub(crate) enum UpstreamBody {
    /// No body (also what a retried request carries: only bodiless requests are retried after
    /// being sent).
    Empty,
    /// The client's body, streamed.
    Streamed {
        inner: Incoming,
        seen: u64,
        limit: u64,
    },
}

impl UpstreamBody {
    pub(crate) fn streamed(inner: Incoming, limit: Option<u64>) -> UpstreamBody {
        UpstreamBody::Streamed {
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
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Streamed { inner, seen, limit } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        *seen = seen.saturating_add(data.len() as u64);
                        if *seen > *limit {
                            return Poll::Ready(Some(Err(RequestBodyError::TooLarge {
                                limit: *limit,
                            })));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Streamed { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Streamed { inner, .. } => inner.size_hint(),
        }
    }
}

/// A response body sent to a client.
pub(crate) enum ProxyBody {
    /// A short body the router wrote itself (errors, 404s).
    Local(Option<Bytes>),
    /// An instance's response, streamed.
    Upstream(Upstream),
}

/// An instance's response body with what it holds until the end.
pub(crate) struct Upstream {
    inner: Incoming,
    /// Counts the request against the instance until the body ends or is dropped.
    in_flight: Option<InFlight>,
    /// The connection, returned to the pool only after a clean end of the body.
    sender: Option<Sender>,
}

impl Upstream {
    pub(crate) fn new(inner: Incoming, in_flight: InFlight, sender: Sender) -> Upstream {
        Upstream {
            inner,
            in_flight: Some(in_flight),
            sender: Some(sender),
        }
    }

    fn finish(&mut self) {
        if let (Some(sender), Some(in_flight)) = (self.sender.take(), self.in_flight.as_ref()) {
            in_flight.instance().release(sender);
        }
        self.in_flight = None;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // hyper stops polling a body that reports its end, so a body dropped after its last
        // frame has still ended cleanly and its connection can be reused.
        if self.inner.is_end_stream() {
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
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(up) => {
                let polled = Pin::new(&mut up.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => up.finish(),
                    Poll::Ready(Some(Ok(_))) if up.inner.is_end_stream() => up.finish(),
                    // A failed stream leaves the connection in an unknown state: it is dropped
                    // with the body, not pooled.
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(bytes) => bytes.is_none(),
            ProxyBody::Upstream(up) => up.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(None) => SizeHint::with_exact(0),
            ProxyBody::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Upstream(up) => up.inner.size_hint(),
        }
    }
}
