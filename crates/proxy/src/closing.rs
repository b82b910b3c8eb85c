//! Graceful shutdown of a listener's client connections: once signalled, every connection is
//! asked to finish (hyper's `graceful_shutdown`: HTTP/1.1 closes after the current response,
//! HTTP/2 sends GOAWAY), and the listener can wait until all have ended.
//!
//! hyper-util's `GracefulShutdown` polls a `watch` channel's change future every time a
//! connection is polled, which is several times per request. Here a connection registers its
//! task's waker once and reads one flag per poll; the signal wakes every registered
//! connection.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

/// A connection that can be asked to finish.
pub(crate) trait Finish: Future {
    fn finish(self: Pin<&mut Self>);
}

/// One listener's shutdown signal and its open connections.
#[derive(Default)]
pub(crate) struct Closing {
    signalled: AtomicBool,
    /// The wakers of the open connections' tasks, by connection number.
    wakers: Mutex<HashMap<u64, Waker>>,
    next: AtomicU64,
    open: AtomicUsize,
    /// Notified when the last open connection ends.
    all_ended: Notify,
}

impl Closing {
    /// Watches `connection`: it runs as it is until the signal, then is asked to finish.
    pub(crate) fn watch<C: Finish>(self: &Arc<Self>, connection: C) -> Watched<C> {
        self.open.fetch_add(1, Ordering::SeqCst);
        Watched {
            connection: Box::pin(connection),
            closing: Arc::clone(self),
            id: self.next.fetch_add(1, Ordering::Relaxed),
            waker: None,
            finishing: false,
        }
    }

    /// Asks every watched connection (and any watched later) to finish, and waits until all
    /// have ended.
    pub(crate) async fn close(&self) {
        self.signalled.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = self
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for waker in wakers {
            waker.wake();
        }
        loop {
            let ended = self.all_ended.notified();
            tokio::pin!(ended);
            // Register before reading the count so that the last end is not missed.
            ended.as_mut().enable();
            if self.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// A connection under watch.
pub(crate) struct Watched<C> {
    connection: Pin<Box<C>>,
    closing: Arc<Closing>,
    id: u64,
    /// The waker registered for this connection's task.
    waker: Option<Waker>,
    finishing: bool,
}

impl<C: Finish> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            // Registered before the flag is read: a signal either sees this waker or is seen
            // by the read below (the lock orders the two).
            let waker = cx.waker().clone();
            this.closing
                .wakers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(this.id, waker.clone());
            this.waker = Some(waker);
        }
        if !this.finishing && this.closing.signalled.load(Ordering::SeqCst) {
            this.finishing = true;
            this.connection.as_mut().finish();
        }
        this.connection.as_mut().poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        if self.waker.is_some() {
            self.closing
                .wakers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
        }
        if self.closing.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.closing.all_ended.notify_waiters();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// A connection that ends one poll after it is asked to finish.
    struct Fake {
        asked: Arc<AtomicBool>,
    }

    impl Future for Fake {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
            if self.asked.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    impl Finish for Fake {
        fn finish(self: Pin<&mut Self>) {
            self.asked.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn close_asks_every_connection_to_finish_and_waits_for_them() {
        let closing = Arc::new(Closing::default());
        let asked: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::default()).collect();
        let tasks: Vec<_> = asked
            .iter()
            .map(|a| {
                tokio::spawn(closing.watch(Fake {
                    asked: Arc::clone(a),
                }))
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(asked.iter().all(|a| !a.load(Ordering::SeqCst)));
        closing.close().await;
        assert!(asked.iter().all(|a| a.load(Ordering::SeqCst)));
        for task in tasks {
            task.await.unwrap();
        }
        // A connection watched after the signal is asked at its first poll.
        let late = Arc::default();
        closing
            .watch(Fake {
                asked: Arc::clone(&late),
            })
            .await;
        assert!(late.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn close_with_no_connection_returns_at_once() {
        Arc::new(Closing::default()).close().await;
    }
}
