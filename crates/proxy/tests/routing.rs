//! End to end on real sockets: weights, sticky sessions, host routing, preview, forwarding
//! headers, limits, timeouts, HTTP/2 (h2c and TLS) and the metrics they produce.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Client, app, router, router_with};
use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_proxy::{
    App, ListenerConfig, RouteRelease, RouteTable, Sticky, TlsFiles, render_prometheus,
};

fn table(releases: Vec<RouteRelease>) -> RouteTable {
    RouteTable::new(releases).unwrap()
}

/// An h2c (prior knowledge) client connection to `addr`, its connection task spawned.
async fn h2c(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<common::BoxBody>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    (sender, tokio::spawn(conn))
}

/// A backend answering "b", and a router serving it as app `shop` with a short header read
/// (and idle) timeout.
async fn quick_timeout_router(timeout: Duration) -> (Backend, common::Router) {
    let backend = Backend::start("b").await;
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let mut config = ListenerConfig::new("127.0.0.1:0".parse().unwrap());
    config.header_read_timeout = timeout;
    let router = router_with(config, vec![shop]).await;
    (backend, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_10_90_give_10_percent_over_10000_requests() {
    let (blue, green) = (Backend::start("blue").await, Backend::start("green").await);
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![
        RouteRelease::new("blue", 10, &[blue.addr]),
        RouteRelease::new("green", 90, &[green.addr]),
    ]));
    let router = router(vec![Arc::clone(&shop)]).await;

    let mut tasks = Vec::new();
    for _ in 0..4 {
        let addr = router.addr;
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let mut counts: HashMap<String, u32> = HashMap::new();
            for _ in 0..2_500 {
                let reply = client.get("/").await;
                assert_eq!(reply.status, StatusCode::OK);
                *counts.entry(reply.body).or_default() += 1;
            }
            counts
        }));
    }
    let mut counts: HashMap<String, u32> = HashMap::new();
    for task in tasks {
        for (k, v) in task.await.unwrap() {
            *counts.entry(k).or_default() += v;
        }
    }
    let blue_count = counts.get("blue\n").copied().unwrap_or(0);
    let green_count = counts.get("green\n").copied().unwrap_or(0);
    assert_eq!(blue_count + green_count, 10_000, "{counts:?}");
    assert!(
        blue_count.abs_diff(1_000) <= 100,
        "blue got {blue_count} of 10,000"
    );

    // The router's own measurements agree with what the clients saw.
    let snapshot = shop.snapshot("blue", Duration::from_secs(60)).unwrap();
    assert_eq!(snapshot.requests, u64::from(blue_count));
    assert_eq!(snapshot.errors, 0);
    let metrics = render_prometheus(&[Arc::clone(&shop)]);
    assert!(
        metrics.contains(&format!(
            "kiln_requests_total{{app=\"shop\",release=\"green\",code_class=\"2xx\"}} {green_count}\n"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "kiln_request_duration_seconds_count{{app=\"shop\",release=\"blue\"}} {blue_count}\n"
    )));
    assert!(metrics.contains(
        "kiln_upstream_errors_total{app=\"shop\",release=\"blue\",kind=\"connect\"} 0\n"
    ));
}

#[tokio::test]
async fn the_sticky_cookie_keeps_a_client_on_its_release() {
    let (blue, green) = (Backend::start("blue").await, Backend::start("green").await);
    let mut config = app("shop");
    config.sticky = Sticky::Cookie;
    let shop = App::new(config);
    shop.set_route(&table(vec![
        RouteRelease::new("blue", 50, &[blue.addr]),
        RouteRelease::new("green", 50, &[green.addr]),
    ]));
    let router = router(vec![Arc::clone(&shop)]).await;

    let mut first_releases = Vec::new();
    let mut cookies = Vec::new();
    for _ in 0..10 {
        let mut client = Client::connect(router.addr).await;
        let first = client.get("/").await;
        let set_cookie = first.headers["set-cookie"].to_str().unwrap().to_owned();
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        assert_eq!(cookie, format!("kiln_release={}", first.body.trim()));
        for _ in 0..20 {
            let reply = client
                .send(Request::get("/").header("cookie", &cookie), common::empty())
                .await;
            assert_eq!(reply.body, first.body, "a sticky client changed release");
            assert!(!reply.headers.contains_key("set-cookie"));
        }
        first_releases.push(first.body);
        cookies.push(cookie);
    }
    // Alternating weights must have put clients on both releases, or stickiness proved nothing.
    assert!(first_releases.contains(&"blue\n".to_owned()));
    assert!(first_releases.contains(&"green\n".to_owned()));

    // A release that loses its weight (an aborted canary) lets its sticky clients go.
    shop.set_route(&table(vec![
        RouteRelease::new("blue", 1, &[blue.addr]),
        RouteRelease::new("green", 0, &[green.addr]),
    ]));
    let mut client = Client::connect(router.addr).await;
    let reply = client
        .send(
            Request::get("/").header("cookie", "kiln_release=green"),
            common::empty(),
        )
        .await;
    assert_eq!(reply.body, "blue\n");
    assert!(
        reply.headers["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("kiln_release=blue;")
    );
}

#[tokio::test]
async fn apps_share_an_address_by_host_and_an_unknown_host_gets_404() {
    let (shop_backend, blog_backend) = (Backend::start("shop").await, Backend::start("blog").await);
    let mut shop_config = app("shop");
    shop_config.hosts = vec!["shop.example".into()];
    let mut blog_config = app("blog");
    blog_config.hosts = vec!["blog.example".into(), "www.blog.example".into()];
    let (shop, blog) = (App::new(shop_config), App::new(blog_config));
    shop.set_route(&table(vec![RouteRelease::new(
        "r1",
        1,
        &[shop_backend.addr],
    )]));
    blog.set_route(&table(vec![RouteRelease::new(
        "r1",
        1,
        &[blog_backend.addr],
    )]));
    let router = router(vec![shop, blog]).await;

    let mut client = Client::connect(router.addr).await;
    for (host, status, body) in [
        ("shop.example", StatusCode::OK, "shop\n"),
        ("Blog.Example:8080", StatusCode::OK, "blog\n"),
        ("www.blog.example", StatusCode::OK, "blog\n"),
        (
            "other.example",
            StatusCode::NOT_FOUND,
            "kiln: no app serves host \"other.example\"\n",
        ),
    ] {
        let reply = client
            .send(Request::get("/").header("host", host), common::empty())
            .await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (status, body),
            "host {host}"
        );
    }
}

#[tokio::test]
async fn the_preview_header_pins_a_request_to_a_release() {
    let (blue, green) = (Backend::start("blue").await, Backend::start("green").await);
    let mut config = app("shop");
    config.preview_header = Some("x-kiln-release".parse().unwrap());
    let shop = App::new(config);
    shop.set_route(&table(vec![
        RouteRelease::new("blue", 1, &[blue.addr]),
        RouteRelease::new("green", 0, &[green.addr]),
    ]));
    let router = router(vec![shop]).await;
    let mut client = Client::connect(router.addr).await;
    let preview = |name: &'static str| Request::get("/").header("x-kiln-release", name);
    for _ in 0..3 {
        assert_eq!(client.get("/").await.body, "blue\n");
        assert_eq!(
            client.send(preview("green"), common::empty()).await.body,
            "green\n"
        );
    }
    let reply = client.send(preview("nope"), common::empty()).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(
        reply.body,
        "kiln: app \"shop\" has no release \"nope\" to preview\n"
    );
}

#[tokio::test]
async fn the_preview_header_is_ignored_unless_configured() {
    let (blue, green) = (Backend::start("blue").await, Backend::start("green").await);
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![
        RouteRelease::new("blue", 1, &[blue.addr]),
        RouteRelease::new("green", 0, &[green.addr]),
    ]));
    let router = router(vec![shop]).await;
    let mut client = Client::connect(router.addr).await;
    let reply = client
        .send(
            Request::get("/").header("x-kiln-release", "green"),
            common::empty(),
        )
        .await;
    assert_eq!(reply.body, "blue\n");
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_dropped() {
    let backend = Backend::start("b").await;
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let router = router(vec![shop]).await;
    let mut client = Client::connect(router.addr).await;
    let reply = client
        .send(
            Request::get("/headers")
                .header("host", "shop.example")
                .header("x-forwarded-for", "203.0.113.9")
                .header("x-forwarded-proto", "https")
                .header("connection", "x-secret")
                .header("x-secret", "1"),
            common::empty(),
        )
        .await;
    let lines: Vec<&str> = reply.body.lines().collect();
    for want in [
        "host: shop.example",
        "x-forwarded-for: 203.0.113.9, 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: shop.example",
        "forwarded: for=127.0.0.1;proto=http;host=\"shop.example\"",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in {lines:?}");
    }
    assert!(!reply.body.contains("x-secret"), "{}", reply.body);
}

#[tokio::test]
async fn apps_sharing_an_address_keep_their_own_body_and_head_limits() {
    let (shop_backend, blog_backend) = (Backend::start("shop").await, Backend::start("blog").await);
    let mut shop_config = app("shop");
    shop_config.hosts = vec!["shop.example".into()];
    shop_config.max_body_bytes = Some(1024);
    shop_config.max_header_bytes = 8192;
    let mut blog_config = app("blog");
    blog_config.hosts = vec!["blog.example".into()];
    blog_config.max_header_bytes = 32 * 1024;
    let (shop, blog) = (App::new(shop_config), App::new(blog_config));
    shop.set_route(&table(vec![RouteRelease::new(
        "r1",
        1,
        &[shop_backend.addr],
    )]));
    blog.set_route(&table(vec![RouteRelease::new(
        "r1",
        1,
        &[blog_backend.addr],
    )]));
    let router = router(vec![shop, blog]).await;

    let upload = |host: &str| {
        Request::post("/upload")
            .header("host", host)
            .header("content-length", "2048")
    };
    let body = || {
        http_body_util::Full::new(bytes::Bytes::from(vec![0_u8; 2048]))
            .map_err(|never| match never {})
            .boxed()
    };
    let reply = Client::connect(router.addr)
        .await
        .send(upload("shop.example"), body())
        .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "kiln: request body larger than 1024 bytes\n"
        )
    );
    let reply = Client::connect(router.addr)
        .await
        .send(upload("blog.example"), body())
        .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "2048\n")
    );

    // A head is read before its Host is known: the listener takes blog's 32 KiB.
    let head = |size: usize| {
        Request::get("/")
            .header("host", "blog.example")
            .header("x-padding", "p".repeat(size))
    };
    let reply = Client::connect(router.addr)
        .await
        .send(head(20 * 1024), common::empty())
        .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "blog\n")
    );
    for (host, padding) in [("blog.example", 40 * 1024), ("shop.example", 20 * 1024)] {
        let reply = raw_status(router.addr, host, padding).await;
        assert_eq!(
            reply, "HTTP/1.1 431 Request Header Fields Too Large",
            "{host}"
        );
    }
}

/// Sends a GET to `host` whose head is about `padding` bytes over a raw connection; the
/// status line.
async fn raw_status(addr: std::net::SocketAddr, host: &str, padding: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\nx-padding: {}\r\n\r\n",
        "p".repeat(padding)
    );
    // The router may answer and close before it has read the whole head.
    let _ = stream.write_all(head.as_bytes()).await;
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply).await;
    let reply = String::from_utf8_lossy(&reply);
    reply.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_connection_that_sends_nothing_or_stalls_before_its_first_request_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_backend, router) = quick_timeout_router(Duration::from_millis(300)).await;
    // Not a byte: the protocol is never known, and the connection must not stay open.
    let mut silent = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?} {rest:?}");
    // Half a head: hyper's own timer.
    let mut slow = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: shop\r\n")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(_))), "{closed:?}");
    // The start of the HTTP/2 preface, then nothing: hyper's HTTP/2 server has no timer for
    // that.
    let mut stalled = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(_))), "{closed:?}");
    // A prompt client is served.
    let reply = Client::connect(router.addr).await.get("/").await;
    assert_eq!((reply.status, reply.body.as_str()), (StatusCode::OK, "b\n"));
}

#[tokio::test]
async fn idle_connections_are_closed_but_not_while_a_response_streams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Long enough that a slow machine still sends its first request in time.
    let timeout = Duration::from_secs(1);
    let (backend, router) = quick_timeout_router(timeout).await;

    // HTTP/2: an event stream quiet for longer than the idle timeout keeps its connection.
    let (mut sender, conn) = h2c(router.addr).await;
    let get = |path: &str| {
        Request::get(format!("http://shop{path}"))
            .body(common::empty())
            .unwrap()
    };
    let mut events = sender.send_request(get("/sse")).await.unwrap().into_body();
    let first = events.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: one\n\n");
    tokio::time::sleep(timeout * 5 / 2).await;
    // Not told GOAWAY meanwhile: a new request is still taken on this connection.
    let reply = sender.send_request(get("/")).await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let body = reply.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"b\n");
    backend.sse_next.add_permits(1);
    let second = events.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&second[..], b"data: two\n\n");
    assert!(events.collect().await.unwrap().to_bytes().is_empty());
    // Then idle: GOAWAY, and the connection ends.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");

    // HTTP/2 with a handshake and no request: told so (GOAWAY), not cut.
    let (_sender, conn) = h2c(router.addr).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");

    // HTTP/1.1: a keep-alive connection waits as long for its next request (hyper's timer).
    let mut idle = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: shop\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut reply)).await;
    assert!(matches!(closed, Ok(Ok(_))), "{closed:?}");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
}

#[tokio::test]
async fn an_http2_client_that_never_answers_goaway_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_backend, router) = quick_timeout_router(Duration::from_millis(300)).await;
    // By hand: the preface, empty SETTINGS, and `GET http://shop/` (HPACK: the static table's
    // :method GET, :scheme http, :path /, then :authority "shop") on stream 1, ending it. Then
    // nothing: no SETTINGS or PING acknowledgement, so hyper's graceful shutdown never ends.
    let mut client = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(&[0, 0, 9, 0x1, 0x5, 0, 0, 0, 1]);
    hello.extend_from_slice(&[0x82, 0x86, 0x84, 0x41, 4, b's', b'h', b'o', b'p']);
    client.write_all(&hello).await.unwrap();
    let mut frames = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut frames)).await;
    assert!(matches!(closed, Ok(Ok(_))), "{closed:?}");
    // It was answered, then told GOAWAY.
    let mut kinds = Vec::new();
    let mut at = 0;
    while at + 9 <= frames.len() {
        let len = usize::from(frames[at]) << 16
            | usize::from(frames[at + 1]) << 8
            | usize::from(frames[at + 2]);
        kinds.push(frames[at + 3]);
        at += 9 + len;
    }
    let (headers, data, goaway) = (0x1, 0x0, 0x7);
    assert!(
        kinds.contains(&headers) && kinds.contains(&data),
        "{kinds:?}"
    );
    assert!(kinds.contains(&goaway), "{kinds:?}");
}

#[tokio::test]
async fn a_stopping_listener_sends_goaway_to_an_http2_client_that_asked_nothing() {
    let backend = Backend::start("b").await;
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let listener = kiln_proxy::Listener::bind(
        ListenerConfig::new("127.0.0.1:0".parse().unwrap()),
        vec![shop],
    )
    .await
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let threads = kiln_proxy::Workers::start(kiln_proxy::WorkersConfig {
        threads: 1,
        pin: false,
    })
    .unwrap();
    let serving = threads.serve(listener).unwrap();
    let (_sender, conn) = h2c(addr).await;
    let drained = tokio::spawn(serving.drain());
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn oversized_bodies_get_413_and_no_instance_gets_503() {
    let backend = Backend::start("b").await;
    let mut config = app("shop");
    config.max_body_bytes = Some(1024);
    let shop = App::new(config);
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let router = router(vec![Arc::clone(&shop)]).await;
    let mut client = Client::connect(router.addr).await;
    let reply = client
        .send(
            Request::post("/upload").header("content-length", "2048"),
            http_body_util::Full::new(bytes::Bytes::from(vec![0_u8; 2048]))
                .map_err(|never| match never {})
                .boxed(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(backend.served(), 0);

    let reply = client
        .send(
            Request::post("/upload"),
            http_body_util::Full::new(bytes::Bytes::from(vec![0_u8; 1000]))
                .map_err(|never| match never {})
                .boxed(),
        )
        .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "1000\n")
    );

    // Every instance unhealthy: the router says so instead of trying one.
    shop.set_route(&table(vec![RouteRelease {
        name: "r1".into(),
        weight: 1,
        instances: vec![kiln_proxy::Instance {
            addr: backend.addr,
            healthy: false,
        }],
    }]));
    let reply = client.get("/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        reply.body,
        "kiln: no healthy instance can take the request\n"
    );
}

#[tokio::test]
async fn an_instance_that_answers_before_reading_the_body_is_heard() {
    let backend = Backend::start("b").await;
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let router = router(vec![shop]).await;
    let mut client = Client::connect(router.addr).await;
    // Far more than the socket buffers hold: the router cannot finish sending it before the
    // instance's answer, which must reach the client rather than a 502 or a timeout.
    let body = vec![0_u8; 32 << 20];
    let reply = client
        .send(
            Request::post("/reject"),
            http_body_util::Full::new(bytes::Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "rejected\n")
    );
}

#[tokio::test]
async fn a_client_still_sending_an_unwanted_body_gets_the_answer_and_a_clean_close() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("b").await;
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let router = router(vec![shop]).await;
    let stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // The client streams a body the instance refuses without reading. Closing a socket with
    // unread bytes resets the connection, and a client busy sending can get the reset before
    // it has read the answer (its next write fails). So the router closes gracefully and
    // reads what still comes: far more than the socket buffers hold must go through after
    // the client has read the answer and the end of the stream.
    let answered = Arc::new(AtomicBool::new(false));
    let sending = tokio::spawn({
        let answered = Arc::clone(&answered);
        async move {
            write
                .write_all(
                    b"POST /reject HTTP/1.1\r\nhost: shop\r\ncontent-length: 1073741824\r\n\r\n",
                )
                .await?;
            let chunk = vec![0_u8; 64 * 1024];
            let mut after = 0;
            while after < 16 << 20 {
                write.write_all(&chunk).await?;
                if answered.load(Ordering::SeqCst) {
                    after += chunk.len();
                }
            }
            Ok::<_, std::io::Error>(())
        }
    });
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), read.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    answered.store(true, Ordering::SeqCst);
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 413 Payload Too Large\r\n")
            && reply.ends_with("\r\n\r\nrejected\n"),
        "{reply:?}"
    );
    let sent = tokio::time::timeout(Duration::from_secs(30), sending)
        .await
        .unwrap()
        .unwrap();
    assert!(sent.is_ok(), "the connection was reset: {sent:?}");
}

#[tokio::test]
async fn a_client_that_shuts_down_its_sending_side_still_gets_its_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("b").await;
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let router = router(vec![shop]).await;
    let mut stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    // The instance answers /slow after a pause, so the end of the client's stream reaches the
    // router while the request waits; a half-closed client is not a client that went away.
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nhost: shop\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 200 OK\r\n") && reply.ends_with("\r\n\r\nb\n"),
        "{reply:?}"
    );
}

/// A raw backend that answers the first request on each connection and closes the
/// connection, unanswered, when a second request arrives on it: an idle connection the
/// instance gave up on (its keep-alive timeout) just as the router reused it.
async fn closes_reused_connections() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !common::read_head(&mut stream).await {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nfresh\n";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                // The next request on this connection is read and dropped with it.
                let _ = common::read_head(&mut stream).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_get_on_a_reused_connection_the_instance_closed_goes_again_on_a_fresh_one() {
    let backend = closes_reused_connections().await;
    let shop = App::new(app("shop"));
    // One instance: there is no other instance to replay on.
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend])]));
    let router = router(vec![Arc::clone(&shop)]).await;
    let mut client = Client::connect(router.addr).await;
    for _ in 0..5 {
        let reply = client.get("/").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::OK, "fresh\n")
        );
    }
    let metrics = render_prometheus(&[shop]);
    assert!(
        !metrics.contains("kind=\"reset\"} 0\n"),
        "no reused connection was reset, so the retry was never exercised: {metrics}"
    );
}

#[tokio::test]
async fn a_silent_instance_gets_504_and_is_counted() {
    let backend = Backend::start("b").await;
    let mut config = app("shop");
    config.request_timeout = Duration::from_millis(200);
    let shop = App::new(config);
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let router = router(vec![Arc::clone(&shop)]).await;
    let mut client = Client::connect(router.addr).await;
    let reply = client.get("/hang").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    let snapshot = shop.snapshot("r1", Duration::from_secs(60)).unwrap();
    assert_eq!((snapshot.requests, snapshot.errors), (1, 1));
    assert!((snapshot.error_rate - 1.0).abs() < f64::EPSILON);
    let metrics = render_prometheus(&[shop]);
    assert!(
        metrics.contains(
            "kiln_upstream_errors_total{app=\"shop\",release=\"r1\",kind=\"timeout\"} 1\n"
        )
    );
    assert!(
        metrics.contains("kiln_requests_total{app=\"shop\",release=\"r1\",code_class=\"5xx\"} 1\n")
    );
}

#[tokio::test]
async fn a_dead_instance_is_skipped_by_retrying_the_connect() {
    let live = Backend::start("live").await;
    // A port nobody listens on: bind, note it, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[dead, live.addr])]));
    let router = router(vec![Arc::clone(&shop)]).await;
    let mut client = Client::connect(router.addr).await;
    for _ in 0..20 {
        // POST is not idempotent, but a failed connect sent nothing, so it may go elsewhere.
        let reply = client.send(Request::post("/upload"), common::empty()).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(live.served(), 20);
    let metrics = render_prometheus(&[shop]);
    assert!(
        !metrics.contains("kind=\"connect\"} 0\n"),
        "the dead instance was never tried: {metrics}"
    );
}

fn tls_files(dir: &std::path::Path) -> TlsFiles {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.cert.pem()).unwrap();
    std::fs::write(&files.key, cert.key_pair.serialize_pem()).unwrap();
    files
}

#[tokio::test]
async fn http2_over_tls_and_h2c_reach_http1_instances() {
    let backend = Backend::start("b").await;
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));

    // h2c with prior knowledge on a plain listener.
    let plain = router(vec![Arc::clone(&shop)]).await;
    let (mut sender, _conn) = h2c(plain.addr).await;
    let response = sender
        .send_request(
            Request::get("http://shop.example/headers")
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .body(common::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("host: shop.example\n"), "{body}");
    // HTTP/2's cookie fields become the one line an HTTP/1.1 instance expects.
    assert!(body.contains("cookie: a=1; b=2\n"), "{body}");

    // TLS with ALPN h2.
    let dir = std::env::temp_dir().join(format!("kiln-proxy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = tls_files(&dir);
    let mut config = ListenerConfig::new("127.0.0.1:0".parse().unwrap());
    config.tls = Some(files.clone());
    let secure = router_with(config, vec![shop]).await;

    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&files.cert).unwrap();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client_config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(secure.addr).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::get("https://localhost/headers")
                .body(common::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("x-forwarded-proto: https\n"), "{body}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn bad_tls_files_are_reported_with_their_path() {
    let shop = App::new(app("shop"));
    let mut config = ListenerConfig::new("127.0.0.1:0".parse().unwrap());
    config.tls = Some(TlsFiles {
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
    });
    let Err(err) = kiln_proxy::Listener::bind(config, vec![shop]).await else {
        panic!("binding with missing TLS files succeeded");
    };
    assert!(
        err.to_string()
            .starts_with("cannot load TLS certificate from /nonexistent/cert.pem: "),
        "{err}"
    );
}

// Request smuggling, hosts and framing (found by a review against RFC 9110/9112 and nginx).

/// Writes `request` (which asks the router to close) on a raw connection and returns
/// everything the router sent back.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&reply).into_owned()
}

/// A router serving one app, `shop`, whose one release has one instance at `instance`.
async fn shop_router(instance: std::net::SocketAddr) -> common::Router {
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[instance])]));
    router(vec![shop]).await
}

const GET_AND_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nhost: shop\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn a_connection_header_naming_content_length_does_not_unframe_the_body() {
    let backend = Backend::start("b").await;
    let router = shop_router(backend.addr).await;
    // The body is itself a request: if the router forwards the POST without its framing, the
    // instance takes the POST as bodiless and the body as a second request that never went
    // through the router.
    let smuggled =
        "GET /smuggled HTTP/1.1\r\nhost: internal.example\r\nx-forwarded-for: 10.0.0.1\r\n\r\n";
    let request = format!(
        "POST /upload HTTP/1.1\r\nhost: shop\r\nconnection: close, content-length\r\ncontent-length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let reply = raw_exchange(router.addr, request.as_bytes()).await;
    let body = reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let second = tokio::time::timeout(Duration::from_millis(500), backend.served_more_than(1))
        .await
        .is_ok();
    assert_eq!(
        (body.as_str(), second),
        (format!("{}\n", smuggled.len()).as_str(), false),
        "the instance got the body as a request of its own: {reply:?}"
    );
}

/// Two apps on one address, each with its own backend, as `shop.example` and `blog.example`.
async fn shop_and_blog() -> (Backend, Backend, common::Router) {
    let (shop_backend, blog_backend) = (Backend::start("shop").await, Backend::start("blog").await);
    let mut shop_config = app("shop");
    shop_config.hosts = vec!["shop.example".into()];
    let mut blog_config = app("blog");
    blog_config.hosts = vec!["blog.example".into()];
    let (shop, blog) = (App::new(shop_config), App::new(blog_config));
    shop.set_route(&table(vec![RouteRelease::new(
        "r1",
        1,
        &[shop_backend.addr],
    )]));
    blog.set_route(&table(vec![RouteRelease::new(
        "r1",
        1,
        &[blog_backend.addr],
    )]));
    let router = router(vec![shop, blog]).await;
    (shop_backend, blog_backend, router)
}

#[tokio::test]
async fn an_absolute_form_target_is_the_host_the_instance_sees() {
    let (_shop, _blog, router) = shop_and_blog().await;
    // RFC 9112 §3.2.2: the Host header of an absolute-form request is ignored, and the
    // forwarded request's Host is generated from the target.
    let reply = raw_exchange(
        router.addr,
        b"GET http://shop.example/headers HTTP/1.1\r\nhost: blog.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    let lines: Vec<&str> = reply.lines().collect();
    assert!(
        lines.contains(&"host: shop.example") && !lines.contains(&"host: blog.example"),
        "shop's instance was told another app's host: {lines:?}"
    );
}

#[tokio::test]
async fn a_request_with_two_host_headers_is_refused() {
    let (shop, blog, router) = shop_and_blog().await;
    // RFC 9112 §3.2: a server MUST answer 400 to a request with more than one Host line. The
    // router routes by the first; an instance (or a framework) that reads the last would
    // take the request for another app's.
    let reply = raw_exchange(
        router.addr,
        b"GET /headers HTTP/1.1\r\nhost: shop.example\r\nhost: blog.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        reply.starts_with("HTTP/1.1 400 "),
        "served (shop {}, blog {}): {reply}",
        shop.served(),
        blog.served()
    );
}

#[tokio::test]
async fn an_http2_request_reaches_the_instance_with_its_authority_as_host() {
    let (_shop, _blog, router) = shop_and_blog().await;
    let (mut sender, _conn) = h2c(router.addr).await;
    // Routed by :authority; a `host` field that disagrees must not reach the instance
    // (RFC 9113 §8.3.1: such a request is malformed).
    let response = sender
        .send_request(
            Request::get("http://shop.example/headers")
                .header("host", "blog.example")
                .body(common::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.starts_with("host: shop.example\n") && !body.contains("blog.example"),
        "{body}"
    );
}

#[tokio::test]
async fn every_x_forwarded_for_line_is_kept_in_the_list() {
    let backend = Backend::start("b").await;
    let router = shop_router(backend.addr).await;
    // RFC 9110 §5.3: several lines of a list field are one list. The first is the client's
    // claim; the second was added by the load balancer in front, and is the one to trust.
    let reply = Client::connect(router.addr)
        .await
        .send(
            Request::get("/headers")
                .header("x-forwarded-for", "6.6.6.6")
                .header("x-forwarded-for", "198.51.100.7"),
            common::empty(),
        )
        .await;
    let lines: Vec<&str> = reply.body.lines().collect();
    assert!(
        lines.contains(&"x-forwarded-for: 6.6.6.6, 198.51.100.7, 127.0.0.1"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_request_without_host_is_refused_or_given_an_empty_one() {
    let backend = Backend::start("b").await;
    let router = shop_router(backend.addr).await;
    // RFC 9112 §3.2: an HTTP/1.1 request without Host gets 400. Forwarded as it is, the
    // instance gets an HTTP/1.1 request without Host, and the client's X-Forwarded-Host,
    // which the router replaces whenever there is a host.
    let reply = raw_exchange(
        router.addr,
        b"GET /headers HTTP/1.1\r\nx-forwarded-host: evil.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    // HTTP/1.0 may leave Host out; the instance speaks HTTP/1.1 and gets an empty one (RFC 9112
    // §3.2: a target without authority), and never the client's X-Forwarded-Host.
    let reply = raw_exchange(
        router.addr,
        b"GET /headers HTTP/1.0\r\nx-forwarded-host: evil.example\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.0 200 "), "{reply}");
    assert!(
        reply.contains("\r\n\r\nhost: \n") && !reply.contains("evil.example"),
        "{reply}"
    );
    // An empty Host says the target has no authority: accepted (RFC 9112 §3.2), and no empty
    // host is claimed in the forwarding headers.
    let reply = raw_exchange(
        router.addr,
        b"GET /headers HTTP/1.1\r\nhost:\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    assert!(
        !reply.contains("x-forwarded-host") && !reply.contains("host=\"\""),
        "{reply}"
    );
}

#[tokio::test]
async fn a_host_that_is_not_a_host_name_matches_no_wildcard() {
    let backend = Backend::start("b").await;
    let mut config = app("shop");
    config.hosts = vec!["*.example.com".into()];
    let shop = App::new(config);
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let router = router(vec![shop]).await;
    // A Host is `uri-host [":" port]` (RFC 9110 §7.2); nginx answers 400 to one with a path
    // separator or a space. An app that builds links from its Host (a password-reset mail)
    // would send `https://evil.test/.example.com/reset?token=…` to evil.test.
    for host in [
        "evil.test/.example.com",
        "evil.test .example.com",
        // Many URL libraries read these as the host evil.test.
        "evil.test:x.example.com",
        "evil.test,x.example.com",
    ] {
        let reply = raw_exchange(
            router.addr,
            format!("GET /headers HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(
            reply.starts_with("HTTP/1.1 400 "),
            "host {host:?} reached the instance: {reply}"
        );
    }
    assert_eq!(backend.served(), 0);
}

/// A raw instance that answers every request with `response` and closes.
async fn raw_backend(response: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !common::read_head(&mut stream).await {
                    return;
                }
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_not_silently_dropped() {
    // The body is gzip-coded, then chunked. The router takes the chunks off and drops the
    // whole Transfer-Encoding header, so the client gets gzip bytes as if they were the
    // content. nginx answers 502 ("upstream sent unknown Transfer-Encoding").
    let backend = raw_backend(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: gzip, chunked\r\n\r\n6\r\n\x1f\x8bGZIP\r\n0\r\n\r\n",
    )
    .await;
    let router = shop_router(backend).await;
    let reply = raw_exchange(router.addr, GET_AND_CLOSE).await;
    assert!(reply.starts_with("HTTP/1.1 502 "), "{reply:?}");
}

#[tokio::test]
async fn a_request_with_a_transfer_coding_other_than_chunked_is_refused() {
    let backend = Backend::start("b").await;
    let router = shop_router(backend.addr).await;
    // Framed anew as chunked only, the body would reach the instance still gzip-coded and
    // labelled as plain (RFC 9112 §6.1: 501 for a coding the server does not understand).
    for codings in ["gzip, chunked", "chunked, chunked"] {
        let request = format!(
            "POST /upload HTTP/1.1\r\nhost: shop\r\ntransfer-encoding: {codings}\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let reply = raw_exchange(router.addr, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 501 "), "{codings}: {reply}");
    }
    assert_eq!(backend.served(), 0);
}

#[tokio::test]
async fn an_invalid_content_length_from_an_instance_is_not_passed_on() {
    // Content-Length is 1*DIGIT (RFC 9110 §8.6). The router reads `+5` as 5 (Rust's integer
    // parse takes a sign) and passes the header on as it came.
    let backend = raw_backend(b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello").await;
    let router = shop_router(backend).await;
    let reply = raw_exchange(router.addr, GET_AND_CLOSE).await;
    assert!(reply.starts_with("HTTP/1.1 502 "), "{reply:?}");
}

#[tokio::test]
async fn a_smuggled_request_answer_goes_to_the_next_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("b").await;
    let router = shop_router(backend.addr).await;
    let mut victim = Client::connect(router.addr).await;
    assert!(
        victim
            .get("/headers")
            .await
            .body
            .contains("host: app.example")
    );
    let smuggled = "GET /slow HTTP/1.1\r\nhost: internal.example\r\n\r\n";
    let request = format!(
        "POST /upload HTTP/1.1\r\nhost: shop\r\nconnection: content-length\r\ncontent-length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let mut attacker = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    attacker.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0_u8; 4096];
    let n = attacker.read(&mut buf).await.unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    // At once, while the instance still works on the smuggled /slow.
    let reply = victim.get("/headers").await;
    assert!(
        reply.body.contains("host: app.example"),
        "the victim got someone else's answer: {:?} (attacker got {first:?})",
        reply.body
    );
}

#[tokio::test]
async fn a_host_cannot_add_elements_to_the_routers_forwarded_header() {
    let backend = Backend::start("b").await;
    let mut config = app("shop");
    config.hosts = vec!["*.example.com".into()];
    let shop = App::new(config);
    shop.set_route(&table(vec![RouteRelease::new("r1", 1, &[backend.addr])]));
    let router = router(vec![shop]).await;
    // Quoted into the router's own element unescaped, the quote would end the string and
    // start an element of the client's (the last, the one an app behind one proxy believes).
    let reply = raw_exchange(
        router.addr,
        b"GET /headers HTTP/1.1\r\nhost: a\", for=6.6.6.6;proto=https;host=\"b.example.com\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    assert_eq!(backend.served(), 0);
}
