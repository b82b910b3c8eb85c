//! End to end on real sockets: server-sent events flow event by event, and an `Upgrade`
//! (WebSocket-style) connection becomes a two-way tunnel.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{Backend, app, router};
use http_body_util::BodyExt;
use hyper::Request;
use hyper_util::rt::TokioIo;
use kiln_proxy::{App, RouteRelease, RouteTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn routed(backend: &Backend) -> (Arc<App>, common::Router) {
    let shop = App::new(app("shop"));
    shop.set_route(&RouteTable::new(vec![RouteRelease::new("r1", 1, &[backend.addr])]).unwrap());
    let router = router(vec![Arc::clone(&shop)]).await;
    (shop, router)
}

#[tokio::test]
async fn server_sent_events_flow_without_buffering() {
    let backend = Backend::start("b").await;
    let (shop, router) = routed(&backend).await;
    let stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::get("/sse")
                .header("host", "app.example")
                .body(common::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // The backend holds its second event until the first has reached this client: a router
    // that buffered the response would never deliver the first, and this would hang.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: one\n\n");
    // While the stream is open the request counts against its instance.
    assert_eq!(shop.in_flight(backend.addr), 1);
    backend.sse_next.add_permits(1);
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&second[..], b"data: two\n\n");
    assert!(body.frame().await.is_none());
    assert_eq!(shop.in_flight(backend.addr), 0);
}

#[tokio::test]
async fn an_upgraded_connection_echoes_both_ways() {
    let backend = Backend::start("b").await;
    let (shop, router) = routed(&backend).await;
    let mut stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 101 switching protocols\r\n"),
        "{head}"
    );
    assert!(head.contains("upgrade: echo\r\n"), "{head}");
    for message in [
        &b"ping"[..],
        b"a longer message after the first",
        &[0_u8, 255, 10, 13],
    ] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0_u8; message.len()];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message);
    }
    // The tunnel is in flight until it closes, so draining waits for it.
    assert_eq!(shop.in_flight(backend.addr), 1);
    drop(stream);
    shop.set_route(&RouteTable::empty());
    assert_eq!(
        shop.drain(backend.addr).await,
        kiln_proxy::DrainOutcome::Drained
    );
    assert_eq!(shop.in_flight(backend.addr), 0);
}

/// A response of many small chunks to a client that reads slowly: the router's writes to the
/// client wait in its outbox, fill the socket, stall, and must still all arrive, in order,
/// including the last chunk (written when the router's side of the exchange is done and the
/// connection only waits for the next request), and the connection then serves another.
#[tokio::test]
async fn many_small_chunks_reach_a_slow_client_whole() {
    let backend = Backend::start("blue").await;
    let (_app, router) = routed(&backend).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(router.addr).await.unwrap();
    client
        .write_all(b"GET /drip HTTP/1.1\r\nhost: app.example\r\n\r\n")
        .await
        .unwrap();
    let read = async {
        // Late and slow: the router's writes pile up first.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut xs = 0_usize;
        let mut tail = Vec::new();
        let mut piece = [0_u8; 2048];
        let mut reads = 0_u32;
        // The head (whose `x-request-id` has an x of its own) is not counted.
        let mut head = Vec::new();
        // The chunked body ends with a zero-size chunk.
        while !tail.ends_with(b"\r\n0\r\n\r\n") {
            let n = client.read(&mut piece).await.unwrap();
            assert!(n > 0, "the router closed the connection");
            let mut body = &piece[..n];
            if head.len() < 4 || !head.ends_with(b"\r\n\r\n") {
                let mut taken = 0;
                for &b in body {
                    head.push(b);
                    taken += 1;
                    if head.ends_with(b"\r\n\r\n") {
                        break;
                    }
                }
                body = &body[taken..];
            }
            xs += body.iter().filter(|&&b| b == b'x').count();
            tail.extend_from_slice(&piece[..n]);
            let keep = tail.len().saturating_sub(16);
            tail.drain(..keep);
            reads += 1;
            if reads.is_multiple_of(50) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        xs
    };
    let xs = tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("the response stalled");
    assert_eq!(xs, 10_000_000);
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: app.example\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.read_to_end(&mut rest),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        String::from_utf8_lossy(&rest).ends_with("blue\n"),
        "{rest:?}"
    );
}
