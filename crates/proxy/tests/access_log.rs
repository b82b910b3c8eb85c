//! Request ids and the access log on real sockets: the id an instance gets is the one the
//! client gets back and the one logged; with a sampling rate of 0 only 5xx responses, and
//! requests their clients gave up on (499), are.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Backend, Client, app, router_with};
use hyper::{Request, StatusCode};
use kiln_proxy::{
    AccessLog, AccessLogConfig, AccessLogTarget, App, ListenerConfig, RouteRelease, RouteTable,
};

fn log_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-proxy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let _ = std::fs::remove_file(&path);
    path
}

/// Flushes the log until it has a line with `id`; every line, parsed.
async fn wait_for_line(log: &AccessLog, path: &Path, id: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        log.flush();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.iter().any(|l| l["request_id"] == id) {
            return lines;
        }
        assert!(Instant::now() < deadline, "no line for {id}: {lines:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_logged_response_names_its_release_instance_and_the_id_the_instance_got() {
    let path = log_file("all");
    let log = AccessLog::open(&AccessLogConfig {
        target: AccessLogTarget::File(path.clone()),
        sample: 1.0,
    })
    .unwrap();
    let backend = Backend::start("b").await;
    let shop = App::new(app("shop"));
    shop.set_route(&RouteTable::new(vec![RouteRelease::new("r1", 1, &[backend.addr])]).unwrap());
    let mut config = ListenerConfig::new("127.0.0.1:0".parse().unwrap());
    config.access_log = Some(log.clone());
    let router = router_with(config, vec![shop]).await;
    let mut client = Client::connect(router.addr).await;
    let reply = client.get("/headers?secret=1").await;
    assert_eq!(reply.status, StatusCode::OK);
    let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        reply.body.contains(&format!("x-request-id: {id}")),
        "{}",
        reply.body
    );

    let lines = wait_for_line(&log, &path, &id).await;
    let line = lines
        .iter()
        .find(|l| l["request_id"] == id.as_str())
        .unwrap();
    assert_eq!(line["app"], "shop");
    assert_eq!(line["release"], "r1");
    assert_eq!(line["instance"], backend.addr.to_string());
    assert_eq!(line["method"], "GET");
    // The query is left out: it may carry secrets.
    assert_eq!(line["path"], "/headers");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes"], reply.body.len());
    assert_eq!(line["client"], "127.0.0.1");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[tokio::test]
async fn sampled_at_zero_only_5xx_responses_are_logged() {
    let path = log_file("zero");
    let log = AccessLog::open(&AccessLogConfig {
        target: AccessLogTarget::File(path.clone()),
        sample: 0.0,
    })
    .unwrap();
    let backend = Backend::start("b").await;
    let mut shop = app("shop");
    shop.hosts = vec!["app.example".to_owned()];
    let shop = App::new(shop);
    shop.set_route(&RouteTable::new(vec![RouteRelease::new("r1", 1, &[backend.addr])]).unwrap());
    // An app whose only instance refuses connections: 502.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let mut broken = app("broken");
    broken.hosts = vec!["broken.example".to_owned()];
    let broken = App::new(broken);
    broken.set_route(&RouteTable::new(vec![RouteRelease::new("r9", 1, &[dead])]).unwrap());
    let mut config = ListenerConfig::new("127.0.0.1:0".parse().unwrap());
    config.access_log = Some(log.clone());
    let router = router_with(config, vec![shop, broken]).await;
    let mut client = Client::connect(router.addr).await;
    let ok = client
        .send(
            Request::get("/").header("x-request-id", "fine-1"),
            common::empty(),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.headers["x-request-id"], "fine-1");
    let failed = client
        .send(
            Request::get("/")
                .header("host", "broken.example")
                .header("x-request-id", "failed-1"),
            common::empty(),
        )
        .await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
    assert_eq!(failed.headers["x-request-id"], "failed-1");

    // A response not sampled is never buffered, so the 5xx's line is the only one.
    let lines = wait_for_line(&log, &path, "failed-1").await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["app"], "broken");
    assert_eq!(lines[0]["release"], "r9");
    assert!(lines[0]["instance"].is_null(), "{:?}", lines[0]);
    assert_eq!(lines[0]["status"], 502);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

/// An instance that reads requests and never answers; counts the heads it got.
async fn silent_backend() -> (std::net::SocketAddr, std::sync::Arc<tokio::sync::Notify>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got_head = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = std::sync::Arc::clone(&got_head);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let notify = std::sync::Arc::clone(&notify);
            tokio::spawn(async move {
                if common::read_head(&mut stream).await {
                    notify.notify_one();
                }
                // Held open, unanswered, until the router closes it.
                let mut rest = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest).await;
            });
        }
    });
    (addr, got_head)
}

#[tokio::test]
async fn an_http2_stream_reset_before_its_answer_is_logged_at_once_with_499() {
    let path = log_file("reset");
    let log = AccessLog::open(&AccessLogConfig {
        target: AccessLogTarget::File(path.clone()),
        sample: 0.0,
    })
    .unwrap();
    let (instance, got_head) = silent_backend().await;
    let shop = App::new(app("shop"));
    shop.set_route(&RouteTable::new(vec![RouteRelease::new("r1", 1, &[instance])]).unwrap());
    let mut config = ListenerConfig::new("127.0.0.1:0".parse().unwrap());
    config.access_log = Some(log.clone());
    let router = router_with(config, vec![shop]).await;
    let tcp = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let request = Request::get("http://shop/wait")
        .header("x-request-id", "reset-1")
        .body(())
        .unwrap();
    let (response, mut stream) = client.send_request(request, true).unwrap();
    // The instance has the request: the router is waiting for its answer.
    tokio::time::timeout(Duration::from_secs(10), got_head.notified())
        .await
        .unwrap();
    stream.send_reset(h2::Reason::CANCEL);
    drop(response);

    // The request would wait 30 s for its instance (the app's request timeout), longer than
    // this waits: it is logged when its client gives up.
    let lines = wait_for_line(&log, &path, "reset-1").await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["bytes"], 0, "{line}");
    assert_eq!(line["app"], "shop", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["path"], "/wait", "{line}");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}
