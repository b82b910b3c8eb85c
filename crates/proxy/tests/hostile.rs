//! What a hostile or broken client can do to the router: HTTP/2 rapid reset (CVE-2023-44487),
//! CONTINUATION floods, and clients that stop reading their responses. Real sockets, raw
//! frames or the `h2` crate's client where exact bytes matter.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{app, router_with};
use kiln_proxy::{App, ListenerConfig, RouteRelease, RouteTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An instance that reads each request head, counts it, never answers, and holds the
/// connection until the router closes it.
struct Hanging {
    addr: SocketAddr,
    heads: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicU64>,
}

async fn hanging_backend() -> Hanging {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let (h, o, a) = (Arc::clone(&heads), Arc::clone(&open), Arc::clone(&accepted));
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let (h, o) = (Arc::clone(&h), Arc::clone(&o));
            tokio::spawn(async move {
                let mut buf = vec![0_u8; 16 * 1024];
                let mut seen = Vec::new();
                let mut counted = false;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if !counted {
                                seen.extend_from_slice(&buf[..n]);
                                if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                                    counted = true;
                                    h.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                        }
                    }
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Hanging {
        addr,
        heads,
        open,
        accepted,
    }
}

/// An instance that answers every request with a 1 GB body, written as fast as it is taken.
async fn endless_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if !common::read_head(&mut stream).await {
                    return;
                }
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n";
                if stream.write_all(head).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                while stream.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

fn shop_on(addr: SocketAddr, request_timeout: Duration) -> Arc<App> {
    let mut config = app("shop");
    config.request_timeout = request_timeout;
    let shop = App::new(config);
    shop.set_route(&RouteTable::new(vec![RouteRelease::new("r1", 1, &[addr])]).unwrap());
    shop
}

/// A listener whose clients may leave their response untaken for `send_timeout`.
fn listener_config(send_timeout: Duration) -> ListenerConfig {
    let mut config = ListenerConfig::new("127.0.0.1:0".parse().unwrap());
    config.send_timeout = send_timeout;
    config
}

/// Waits (10 s at most) until `shop` has no request in flight on `instance`.
async fn until_nothing_in_flight(shop: &App, instance: SocketAddr) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    while shop.in_flight(instance) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shop.in_flight(instance)
}

/// An instance that never answers, a router to it, and an `h2` client connection to the
/// router (its connection task spawned).
async fn h2_to_a_hanging_instance() -> (
    Hanging,
    common::Router,
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let instance = hanging_backend().await;
    let shop = shop_on(instance.addr, Duration::from_secs(30));
    let router = router_with(listener_config(Duration::from_secs(60)), vec![shop]).await;
    let tcp = TcpStream::connect(router.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let client = client.ready().await.unwrap();
    (instance, router, client, conn)
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET http://shop/` (HPACK: :method GET, :scheme http, :path /, :authority "shop" literal
/// without indexing).
const GET_SHOP: &[u8] = &[0x82, 0x86, 0x84, 0x01, 4, b's', b'h', b'o', b'p'];

#[tokio::test]
async fn rapid_reset_after_the_router_accepted_the_streams_is_bounded() {
    let (instance, _router, mut client, conn) = h2_to_a_hanging_instance().await;
    let started = Instant::now();
    let rounds: u64 = 30;
    let per_round = 100_u64;
    let mut sent = 0_u64;
    let mut refused = None;
    'rounds: for round in 0..rounds {
        let mut streams = Vec::new();
        for _ in 0..per_round {
            client = match client.ready().await {
                Ok(c) => c,
                Err(e) => {
                    refused = Some(e.to_string());
                    break 'rounds;
                }
            };
            let req = hyper::Request::get("http://shop/").body(()).unwrap();
            match client.send_request(req, true) {
                Ok(pair) => streams.push(pair),
                Err(e) => {
                    refused = Some(e.to_string());
                    break 'rounds;
                }
            }
            sent += 1;
        }
        // Until the instance has every one of them (the router forwarded them), or the router
        // has stopped taking them.
        let want = (round + 1) * per_round;
        let deadline = Instant::now() + Duration::from_secs(2);
        while instance.heads.load(Ordering::SeqCst) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if conn.is_finished() {
            break;
        }
        for (response, mut stream) in streams {
            stream.send_reset(h2::Reason::CANCEL);
            drop(response);
        }
    }
    let elapsed = started.elapsed();
    // Let the router notice the resets.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let forwarded = instance.heads.load(Ordering::SeqCst);
    let accepted = instance.accepted.load(Ordering::SeqCst);
    let still_open = instance.open.load(Ordering::SeqCst);
    eprintln!(
        "streams sent {sent} in {elapsed:?}; forwarded to the instance {forwarded} over {accepted} \
         instance connections ({still_open} still open); client connection ended: {}; refused: {refused:?}",
        conn.is_finished()
    );
    // nginx ends an HTTP/2 connection after `keepalive_requests` (1000) streams, and since
    // 1.25.3 also when too many streams are reset early; Envoy closes a connection once more
    // than half of its first 100+ streams were reset prematurely.
    assert!(
        sent < rounds * per_round,
        "one client connection had {sent} requests forwarded and reset ({forwarded} reached the \
         instance, on {accepted} fresh connections) and was never told GOAWAY"
    );
}

/// The same with a client that never acknowledges the PING sent with GOAWAY, so hyper would
/// go on taking its new streams: it is closed all the same.
#[tokio::test]
async fn rapid_reset_from_a_client_that_ignores_goaway_is_cut_off() {
    let instance = hanging_backend().await;
    let shop = shop_on(instance.addr, Duration::from_secs(30));
    let router = router_with(listener_config(Duration::from_secs(60)), vec![shop]).await;
    let (mut read, mut write) = TcpStream::connect(router.addr).await.unwrap().into_split();
    // Reads (frames are not answered by reading) until the router closes.
    let closed = tokio::spawn(async move {
        let mut sink = Vec::new();
        read.read_to_end(&mut sink).await
    });
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    write.write_all(&hello).await.unwrap();
    let mut stream = 1_u32;
    for round in 1..=30_u64 {
        let first = stream;
        let mut headers = Vec::new();
        for _ in 0..100 {
            headers.extend(frame(0x1, 0x5, stream, GET_SHOP));
            stream += 2;
        }
        if write.write_all(&headers).await.is_err() || closed.is_finished() {
            break;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while instance.heads.load(Ordering::SeqCst) < round * 100 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // RST_STREAM (CANCEL) for each.
        let resets: Vec<u8> = (first..stream)
            .step_by(2)
            .flat_map(|id| frame(0x3, 0, id, &[0, 0, 0, 0x8]))
            .collect();
        if write.write_all(&resets).await.is_err() {
            break;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), closed).await;
    assert!(matches!(ended, Ok(Ok(Ok(_)))), "{ended:?}");
    let forwarded = instance.heads.load(Ordering::SeqCst);
    assert!(forwarded < 3000, "{forwarded} requests forwarded");
}

/// The classic rapid reset (HEADERS then RST_STREAM at once): h2's pending-accept limit.
#[tokio::test]
async fn rapid_reset_before_the_router_accepted_the_streams_gets_goaway() {
    let (instance, _router, mut client, conn) = h2_to_a_hanging_instance().await;
    let mut sent = 0;
    let mut error = None;
    for _ in 0..100_000 {
        client = match client.ready().await {
            Ok(c) => c,
            Err(e) => {
                error = Some(e);
                break;
            }
        };
        let req = hyper::Request::get("http://shop/").body(()).unwrap();
        match client.send_request(req, true) {
            Ok((_response, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
        sent += 1;
        if sent % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    eprintln!(
        "sent {sent}, error {error:?}, forwarded {}, connection: {ended:?}",
        instance.heads.load(Ordering::SeqCst)
    );
    assert!(sent < 100_000, "never refused");
}

// A client that stops reading its response (slow read). nginx's `send_timeout` closes a
// connection whose client takes nothing for that long; without one, the request held its
// instance connection and in-flight count for ever (and a drain of the instance waited out its
// whole drain timeout).

#[tokio::test]
async fn an_http1_client_that_stops_reading_its_response_is_cut_off() {
    let instance = endless_backend().await;
    let shop = shop_on(instance, Duration::from_secs(1));
    let router = router_with(
        listener_config(Duration::from_secs(1)),
        vec![Arc::clone(&shop)],
    )
    .await;
    let mut client = TcpStream::connect(router.addr).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: shop\r\n\r\n")
        .await
        .unwrap();
    // The response flows, then stalls on the client's full socket: it reads nothing.
    while shop.in_flight(instance) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(until_nothing_in_flight(&shop, instance).await, 0);
    drop(client);
}

#[tokio::test]
async fn an_http2_client_that_opens_its_windows_and_reads_nothing_is_cut_off() {
    let instance = endless_backend().await;
    let shop = shop_on(instance, Duration::from_secs(30));
    let router = router_with(
        listener_config(Duration::from_secs(1)),
        vec![Arc::clone(&shop)],
    )
    .await;
    let mut client = TcpStream::connect(router.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE = 2^31 - 1, and the connection window opened as wide: flow
    // control holds nothing back, and every stream's response piles up in the router.
    hello.extend(frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    hello.extend(frame(0x8, 0, 0, &(0x7fff_ffff_u32 - 65_535).to_be_bytes()));
    for i in 0..200_u32 {
        hello.extend(frame(0x1, 0x5, 1 + 2 * i, GET_SHOP));
    }
    client.write_all(&hello).await.unwrap();
    while shop.in_flight(instance) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // At most 128 streams at once (nginx's default), not hyper's 200.
    assert!(
        shop.in_flight(instance) <= 128,
        "{}",
        shop.in_flight(instance)
    );
    assert_eq!(until_nothing_in_flight(&shop, instance).await, 0);
    drop(client);
}

/// CONTINUATION flood: HEADERS without END_HEADERS, then empty CONTINUATION frames. (Written
/// bytes alone cannot show the cut: a closed client socket lingers, reading and discarding.)
#[tokio::test]
async fn a_continuation_flood_is_cut_short() {
    let instance = hanging_backend().await;
    let shop = shop_on(instance.addr, Duration::from_secs(30));
    let router = router_with(listener_config(Duration::from_secs(60)), vec![shop]).await;
    let client = TcpStream::connect(router.addr).await.unwrap();
    let (mut read, mut write) = client.into_split();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    hello.extend(frame(0x1, 0x1, 1, GET_SHOP));
    write.write_all(&hello).await.unwrap();
    let flood = tokio::spawn(async move {
        let continuation = frame(0x9, 0, 1, &[]).repeat(1000);
        let mut sent = 0_u64;
        while write.write_all(&continuation).await.is_ok() && sent < 100_000_000 {
            sent += 1000;
        }
        sent
    });
    let mut frames = Vec::new();
    let mut buf = vec![0_u8; 4096];
    let goaway = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            frames.extend_from_slice(&buf[..n]);
            let mut at = 0;
            while at + 9 <= frames.len() {
                let len = usize::from(frames[at]) << 16
                    | usize::from(frames[at + 1]) << 8
                    | usize::from(frames[at + 2]);
                if frames[at + 3] == 0x7 && at + 9 + len <= frames.len() {
                    return Some(frames[at + 9..at + 9 + len].to_vec());
                }
                at += 9 + len;
            }
        }
    })
    .await;
    flood.abort();
    eprintln!("GOAWAY payload: {goaway:?}");
    let payload = goaway.unwrap().unwrap();
    // Error code 0xb: ENHANCE_YOUR_CALM.
    assert_eq!(payload[4..8], [0, 0, 0, 0xb]);
}
