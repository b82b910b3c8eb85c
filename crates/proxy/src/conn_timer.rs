//! The timer hyper uses for one client connection's header read timeout.
//!
//! hyper's HTTP/1.1 server starts a header read timeout for every request head it waits for
//! and drops it once the head is read; with hyper-util's `TokioTimer` that is a fresh tokio
//! timer per request, registered in and removed from the runtime's timer wheel each time. This
//! timer keeps one tokio timer per client connection and moves it forward for each request
//! instead: moving a registered timer later is an atomic store.
//!
//! **Invariant:** a timer handed out fires no earlier than the deadline it was given; a
//! recycled timer that fires later than needed is only a spurious wake-up of its connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

/// One client connection's timer source.
#[derive(Clone, Default)]
pub(crate) struct ConnectionTimer {
    /// The connection's tokio timer while no header read timeout is running.
    spare: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let spare = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let inner = match spare {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Box::pin(Recycled {
            inner: Some(inner),
            spare: Arc::clone(&self.spare),
        })
    }

    fn now(&self) -> Instant {
        // tokio's clock, so that paused time in tests applies.
        tokio::time::Instant::now().into_std()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Recycled>() {
            Some(recycled) => recycled.reset(new_deadline),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// A tokio timer lent to hyper; it goes back to its connection when hyper drops it.
struct Recycled {
    inner: Option<Pin<Box<tokio::time::Sleep>>>,
    spare: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl Recycled {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        if let Some(inner) = self.get_mut().inner.as_mut() {
            inner
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
        }
    }
}

impl Future for Recycled {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut().inner.as_mut() {
            Some(inner) => inner.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Sleep for Recycled {}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            *self.spare.lock().unwrap_or_else(PoisonError::into_inner) = Some(inner);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_recycled_timer_fires_at_its_new_deadline_not_its_old_one() {
        let timer = ConnectionTimer::default();
        let start = tokio::time::Instant::now().into_std();
        let first = timer.sleep_until(start + Duration::from_secs(5));
        drop(first);
        // The same tokio timer, moved from 5 s to 30 s.
        let second = timer.sleep_until(start + Duration::from_secs(30));
        let fired = tokio::time::timeout(Duration::from_secs(29), second).await;
        assert!(fired.is_err(), "fired before its deadline");
        let third = timer.sleep_until(start + Duration::from_secs(31));
        third.await;
        assert_eq!(
            tokio::time::Instant::now().into_std() - start,
            Duration::from_secs(31)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reset_moves_a_running_timer_either_way() {
        let timer = ConnectionTimer::default();
        let start = tokio::time::Instant::now().into_std();
        let mut sleep = timer.sleep_until(start + Duration::from_secs(30));
        timer.reset(&mut sleep, start + Duration::from_secs(2));
        sleep.await;
        assert_eq!(
            tokio::time::Instant::now().into_std() - start,
            Duration::from_secs(2)
        );
    }
}
