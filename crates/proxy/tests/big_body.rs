//! End to end on real sockets: a 1 GiB request body streams through the router with bounded
//! memory. Alone in its file so that the process's peak memory is this test's alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use common::{Backend, Client, CountingBody, app, router};
use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use kiln_proxy::{App, RouteRelease, RouteTable};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// The process's peak resident memory so far, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_request_body_streams_with_bounded_memory() {
    let backend = Backend::start("b").await;
    let shop = App::new(app("shop"));
    shop.set_route(&RouteTable::new(vec![RouteRelease::new("r1", 1, &[backend.addr])]).unwrap());
    let router = router(vec![shop]).await;
    let mut client = Client::connect(router.addr).await;
    // Warm up so that one-time allocations are not counted as growth.
    assert_eq!(client.get("/").await.status, StatusCode::OK);
    let before = peak_rss();

    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::clone(&backend.received);
    let max_gap = Arc::new(AtomicU64::new(0));
    let body = CountingBody {
        left: GIB,
        chunk: Bytes::from(vec![7_u8; 64 * 1024]),
        sent: Arc::clone(&sent),
        on_frame: Box::new({
            let max_gap = Arc::clone(&max_gap);
            move |sent| {
                // Bytes the client has produced that the backend has not yet read: whatever
                // sits in socket buffers and in the router. A buffering router would let this
                // grow to the whole body.
                let gap = sent - received.load(Ordering::SeqCst);
                max_gap.fetch_max(gap, Ordering::SeqCst);
            }
        }),
    };
    let reply = client.send(Request::post("/upload"), body.boxed()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, format!("{GIB}\n"));
    assert_eq!(backend.received.load(Ordering::SeqCst), GIB);

    let gap = max_gap.load(Ordering::SeqCst);
    assert!(
        gap < 64 * MIB,
        "up to {} MiB were held between client and backend",
        gap / MIB
    );
    let growth = peak_rss().saturating_sub(before);
    assert!(
        growth < 128 * MIB,
        "peak memory grew by {} MiB",
        growth / MIB
    );
}
