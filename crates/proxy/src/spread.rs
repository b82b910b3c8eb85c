//! Spreading a listener's connections evenly over the threads that serve copies of it.
//!
//! A client connection stays on the thread that accepted it, so each thread's share of the
//! connections is its share of the work. The kernel does not look at load when it hands out a
//! new connection: it goes to whichever thread accepts first (or, with `SO_REUSEPORT`, by a
//! hash of its addresses), and a burst of connections opened together (a load generator, a
//! browser's six) can land mostly on one thread. The connections of a busy thread then wait
//! for it while another thread idles.
//!
//! So each thread counts the connections it serves (on every listener), and a thread that
//! accepts a connection while another copy's thread serves fewer passes it to that thread (HAProxy balances its
//! threads the same way). Passing costs a channel message and moving the socket to the other
//! thread's event loop, once per connection; nothing per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The copies of one listener being served, each with its thread's connection count.
#[derive(Default)]
pub(crate) struct Group {
    members: Mutex<Vec<Member>>,
    next_id: AtomicUsize,
}

struct Member {
    id: usize,
    load: Arc<AtomicUsize>,
    inbox: mpsc::UnboundedSender<Handed>,
}

/// A connection one thread accepted and passed to another.
pub(crate) struct Handed {
    pub(crate) stream: std::net::TcpStream,
    pub(crate) peer: SocketAddr,
    /// Already counted on the receiving thread, so that other threads see it at once.
    pub(crate) load: Counted,
}

/// One connection in a thread's count, for as long as it lives.
pub(crate) struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(load: &Arc<AtomicUsize>) -> Counted {
        load.fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(load))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A copy's place in its [`Group`], for as long as it serves.
pub(crate) struct Membership {
    group: Arc<Group>,
    id: usize,
    load: Arc<AtomicUsize>,
    /// Connections other threads passed to this one.
    pub(crate) inbox: mpsc::UnboundedReceiver<Handed>,
}

thread_local! {
    /// How many client connections this thread serves, on all its listeners.
    static LOAD: Arc<AtomicUsize> = Arc::new(AtomicUsize::new(0));
}

impl Group {
    /// Joins from the thread that will serve the copy.
    pub(crate) fn join(self: &Arc<Self>) -> Membership {
        self.join_counting(LOAD.with(Arc::clone))
    }

    /// Joins with `load` as the serving thread's count (made ahead for that thread: see
    /// `Workers::serve`).
    pub(crate) fn join_counting(self: &Arc<Self>, load: Arc<AtomicUsize>) -> Membership {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (send, inbox) = mpsc::unbounded_channel();
        self.members().push(Member {
            id,
            load: Arc::clone(&load),
            inbox: send,
        });
        Membership {
            group: Arc::clone(self),
            id,
            load,
            inbox,
        }
    }

    fn members(&self) -> MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Membership {
    /// Counts a connection this thread serves.
    pub(crate) fn count(&self) -> Counted {
        Counted::new(&self.load)
    }

    /// Passes a connection this thread accepted to the thread that serves the fewest, if that
    /// is fewer than this one serves. Returns it when it stays here.
    pub(crate) fn place(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(TcpStream, SocketAddr, Counted)> {
        let mine = self.load.load(Ordering::Relaxed);
        let target = {
            let members = self.group.members();
            members
                .iter()
                .filter(|m| m.id != self.id)
                .min_by_key(|m| m.load.load(Ordering::Relaxed))
                .filter(|m| m.load.load(Ordering::Relaxed) < mine)
                .map(|m| (Arc::clone(&m.load), m.inbox.clone()))
        };
        // The group's lock is not held across the system calls below.
        let Some((target_load, inbox)) = target else {
            return Some((stream, peer, self.count()));
        };
        let load = Counted::new(&target_load);
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                // Taking the socket out of this thread's event loop failed: it is closed.
                tracing::warn!(%peer, %error, "cannot pass a connection to another thread");
                return None;
            }
        };
        match inbox.send(Handed { stream, peer, load }) {
            Ok(()) => None,
            // The other thread stopped serving: serve it here.
            Err(mpsc::error::SendError(handed)) => match TcpStream::from_std(handed.stream) {
                Ok(stream) => Some((stream, peer, self.count())),
                Err(error) => {
                    tracing::warn!(%peer, %error, "cannot take back a connection");
                    None
                }
            },
        }
    }

    /// Leaves the group (no thread passes connections here any more) and returns those
    /// already passed, to be served.
    pub(crate) fn leave(mut self) -> Vec<Handed> {
        self.group.members().retain(|m| m.id != self.id);
        self.inbox.close();
        let mut left = Vec::new();
        while let Ok(handed) = self.inbox.try_recv() {
            left.push(handed);
        }
        left
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.group.members().retain(|m| m.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::net::TcpListener;

    async fn connection(listener: &TcpListener) -> (TcpStream, SocketAddr, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (stream, peer) = accepted.unwrap();
        (stream, peer, client.unwrap())
    }

    #[tokio::test]
    async fn a_burst_accepted_by_one_thread_ends_up_even() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let group = Arc::new(Group::default());
        let busy = group.join_counting(Arc::default());
        let mut idle = group.join_counting(Arc::default());
        let (mut here, mut clients) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let (stream, peer, client) = connection(&listener).await;
            clients.push(client);
            if let Some(kept) = busy.place(stream, peer) {
                here.push(kept);
            }
        }
        let mut passed = Vec::new();
        while let Ok(handed) = idle.inbox.try_recv() {
            passed.push(handed);
        }
        assert_eq!((here.len(), passed.len()), (5, 5));
        assert_eq!(idle.load.load(Ordering::Relaxed), 5);
        // A connection that ends leaves its thread's count.
        drop(passed.pop());
        assert_eq!(idle.load.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_thread_that_left_gets_nothing_and_hands_back_what_it_was_passed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let group = Arc::new(Group::default());
        let first = group.join_counting(Arc::default());
        let second = group.join_counting(Arc::default());
        let (stream, peer, _c1) = connection(&listener).await;
        let kept = first.place(stream, peer);
        let (stream, peer, _c2) = connection(&listener).await;
        assert!(
            first.place(stream, peer).is_none(),
            "passed to the idle thread"
        );
        let left = second.leave();
        assert_eq!(left.len(), 1);
        drop(left);
        let (stream, peer, _c3) = connection(&listener).await;
        assert!(
            first.place(stream, peer).is_some(),
            "nobody else to pass to"
        );
        drop(kept);
    }
}
