//! The router process's protocol end to end, in one test process: a router serving a state,
//! fed by a `RemotePlane`; a second router started on the same state takes the sockets, the
//! apps and their tables over while a client keeps its requests going; the first exits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kiln_dataplane::wire::AppSpec;
use kiln_dataplane::{Plane, RemotePlane, RouterConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An instance: answers every HTTP/1.1 request on a connection with `ok`.
async fn backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A router on `state`, run as a task; the handle ends when the router does.
fn router(state: &Path) -> tokio::task::JoinHandle<()> {
    let cfg = RouterConfig {
        state: state.to_owned(),
        workers: kiln_proxy::WorkersConfig::new(1),
        access_log: None,
        // Its sender dropped: never reopened.
        reopen_access_log: tokio::sync::watch::channel(()).1,
    };
    tokio::spawn(async move {
        kiln_dataplane::run(cfg, std::future::pending())
            .await
            .unwrap();
    })
}

async fn wait_for_router(state: &Path, not_boot: Option<&str>) -> kiln_dataplane::wire::RouterInfo {
    for _ in 0..500 {
        if let Ok(info) = kiln_dataplane::hello(&kiln_dataplane::socket(state)).await
            && Some(info.boot.as_str()) != not_boot
        {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no router came up");
}

/// Keep-alive clients sending `GET /` until stopped: (answered 200, failed).
fn load(port: u16, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (ok, failed, stop) = (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&stop));
            clients.push(tokio::spawn(async move {
                let mut stream: Option<tokio::net::TcpStream> = None;
                while !stop.load(Ordering::SeqCst) {
                    let s = match &mut stream {
                        Some(s) => s,
                        None => match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                            Ok(s) => stream.insert(s),
                            Err(_) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                continue;
                            }
                        },
                    };
                    let sent = s.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n").await;
                    let mut answer = vec![0u8; 4096];
                    let got = match sent {
                        Ok(()) => s.read(&mut answer).await.unwrap_or(0),
                        Err(_) => 0,
                    };
                    let text = String::from_utf8_lossy(&answer[..got]).to_lowercase();
                    if text.starts_with("http/1.1 200") && text.ends_with("ok") {
                        ok.fetch_add(1, Ordering::SeqCst);
                        if text.contains("connection: close") {
                            stream = None;
                        }
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        stream = None;
                    }
                }
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
        (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_router_takes_the_sockets_and_tables_over_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let instance = backend().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let first = router(state);
    let info = wait_for_router(state, None).await;
    // Only the daemon's user may feed the router (its state directory is private too).
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(kiln_dataplane::socket(state))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let remote = RemotePlane::attach(&kiln_dataplane::socket(state), None, "test")
        .await
        .unwrap();
    let plane = Plane::Process(Arc::clone(&remote));
    let mut config = kiln_proxy::AppConfig::new("web");
    config.hosts = vec!["web".to_owned()];
    let spec = AppSpec::new(&config, ([127, 0, 0, 1], port).into(), None);
    assert!(
        !plane.put_app(spec.clone()).await.unwrap(),
        "a new app has no table"
    );
    let table =
        kiln_proxy::RouteTable::new(vec![kiln_proxy::RouteRelease::new("r1", 1, &[instance])])
            .unwrap();
    plane.set_route("web", &table).await.unwrap();
    assert!(
        plane.put_app(spec.clone()).await.unwrap(),
        "the same app again keeps its table"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(port, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Three handovers under load.
    let mut boot = info.boot;
    let mut routers = vec![first];
    for _ in 0..3 {
        routers.push(router(state));
        let next = wait_for_router(state, Some(&boot)).await;
        assert_eq!(next.apps, vec!["web".to_owned()], "the apps came along");
        boot = next.boot;
        // The one it replaced ends once its connections finished.
        let old = routers.remove(0);
        tokio::time::timeout(Duration::from_secs(10), old)
            .await
            .expect("the old router did not exit")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = clients.await.unwrap();
    assert!(ok > 100, "the clients barely ran: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);

    // The daemon's attachment noticed the change: it feeds the new router again.
    let mut resync = false;
    for _ in 0..500 {
        resync = remote.take_resync();
        if resync {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(resync, "the attachment did not notice the new router");
    // The table came with the handover: the new router already routes the app.
    assert!(plane.put_app(spec).await.unwrap());
    let text = plane.metrics().await.unwrap();
    assert!(text.contains("web"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_with_nothing_to_serve_and_no_daemon_exits() {
    let dir = tempfile::tempdir().unwrap();
    let handle = router(dir.path());
    wait_for_router(dir.path(), None).await;
    tokio::time::timeout(Duration::from_secs(15), handle)
        .await
        .expect("an idle router kept running")
        .unwrap();
    assert!(!kiln_dataplane::socket(dir.path()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_state_is_gone_exits() {
    let dir = tempfile::tempdir().unwrap();
    let handle = router(dir.path());
    wait_for_router(dir.path(), None).await;
    std::fs::remove_file(kiln_dataplane::socket(dir.path())).unwrap();
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("the router outlived its socket")
        .unwrap();
}
