//! The periodic full drift rescan every provider runs behind its fast path (inotify on the
//! local provider, the engine's event stream on docker), for as long as the provider lives.

use std::future::Future;
use std::sync::Weak;
use std::time::Duration;

/// A provider with a periodic full check.
pub(crate) trait Rescan: Send + Sync + 'static {
    /// Time between passes.
    fn interval(&self) -> Duration;

    /// One pass over every instance the provider holds.
    fn pass(&self) -> impl Future<Output = ()> + Send;
}

/// Runs `pass` every `interval` until the provider is dropped.
pub(crate) async fn every_interval<P: Rescan>(provider: Weak<P>) {
    let interval = match provider.upgrade() {
        Some(p) => p.interval(),
        None => return,
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(p) = provider.upgrade() else {
            return;
        };
        p.pass().await;
    }
}
