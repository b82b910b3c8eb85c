//! The router's threads ([`Workers`]): every thread serves, connections spread over them, a
//! stopped listener stops accepting and lets its connections finish, and pinned threads run
//! on a core each.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Client, app};
use kiln_proxy::{App, Listener, ListenerConfig, RouteRelease, RouteTable, Workers, WorkersConfig};
use tokio::io::AsyncReadExt;

async fn served_app(backend: &Backend) -> Arc<App> {
    let shop = App::new(app("shop"));
    shop.set_route(&RouteTable::new(vec![RouteRelease::new("r1", 1, &[backend.addr])]).unwrap());
    shop
}

/// The tests look at this process's router threads by name, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// [`router_threads`] once there are `n` (a thread names itself as it starts).
fn started_router_threads(n: usize) -> BTreeMap<String, (u64, String)> {
    for _ in 0..200 {
        let threads = router_threads();
        if threads.len() == n {
            return threads;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    router_threads()
}

/// CPU time (clock ticks) and allowed cores of each router thread of this process, by name.
fn router_threads() -> BTreeMap<String, (u64, String)> {
    let mut threads = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        // A thread that ends while this reads is skipped.
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        let name = name.trim();
        if !name.starts_with("kiln-router-") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
        let after = stat.rsplit_once(')').unwrap().1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let cpu = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let Ok(status) = std::fs::read_to_string(path.join("status")) else {
            continue;
        };
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_owned();
        threads.insert(name.to_owned(), (cpu, allowed));
    }
    threads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_thread_serves_and_a_stopped_listener_refuses_new_connections() {
    let _serial = SERIAL.lock().await;
    let backend = Backend::start("blue").await;
    let shop = served_app(&backend).await;
    let router = Workers::start(WorkersConfig {
        threads: 2,
        pin: false,
    })
    .unwrap();
    let listener = Listener::bind(
        ListenerConfig::new("127.0.0.1:0".parse().unwrap()),
        vec![shop],
    )
    .await
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = router.serve(listener).unwrap();

    // Connections opened together, each busy: both threads must take a share of the work.
    let before = started_router_threads(2);
    assert_eq!(before.len(), 2, "threads: {before:?}");
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(Client::connect(addr).await);
    }
    let mut load = Vec::new();
    for mut client in clients {
        load.push(tokio::spawn(async move {
            for _ in 0..3000 {
                let reply = client.get("/").await;
                assert_eq!(reply.body, "blue\n");
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for l in load {
        clients.push(l.await.unwrap());
    }
    let after = router_threads();
    for (name, (cpu, _)) in &after {
        let used = cpu - before[name].0;
        assert!(used > 0, "{name} served nothing: {before:?} -> {after:?}");
    }

    // Stopped: no new connection is accepted, and an idle one is closed.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Draining waits for every copy to stop; their sockets are closed by then.
    tokio::time::timeout(Duration::from_secs(10), serving.drain())
        .await
        .expect("the drain did not end");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the stopped listener still accepts"
    );
    let mut byte = [0_u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "an idle connection stayed open: {read:?}"
    );
    drop(clients);

    // With its listener stopped and the `Workers` dropped, every thread ends.
    drop(router);
    assert!(
        started_router_threads(0).is_empty(),
        "router threads left running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_threads_run_on_a_core_each() {
    let _serial = SERIAL.lock().await;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if cores < 2 {
        eprintln!("one core: nothing to pin apart");
        return;
    }
    let _router = Workers::start(WorkersConfig {
        threads: 2,
        pin: true,
    })
    .unwrap();
    // The threads pin themselves as they start.
    let mut threads = started_router_threads(2);
    for _ in 0..100 {
        if threads
            .values()
            .all(|(_, allowed)| !allowed.contains(['-', ',']))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        threads = router_threads();
    }
    let allowed: Vec<&str> = threads.values().map(|(_, a)| a.as_str()).collect();
    assert_eq!(allowed.len(), 2, "{threads:?}");
    assert!(
        allowed.iter().all(|a| a.parse::<usize>().is_ok()) && allowed[0] != allowed[1],
        "not one core each: {threads:?}"
    );
}

/// One request on a fresh connection, as a client without keep-alive sends it.
async fn one_shot(addr: std::net::SocketAddr) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: app.example\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let reply = String::from_utf8_lossy(&reply).into_owned();
        if reply.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(format!("answer: {reply:?}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .map_err(|_| "no answer within 3 s".to_owned())?
}

/// The daemon's way of changing the apps on an address: a new listener on a copy of the old
/// one's socket, served, then the old one stopped. The old one drains a slow request for a
/// while; connections opened meanwhile must all be served, none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebinding_an_address_loses_no_new_connection() {
    let _serial = SERIAL.lock().await;
    let backend = Backend::start("blue").await;
    let mut config = app("shop");
    config.drain_timeout = Duration::from_secs(2);
    let shop = App::new(config);
    shop.set_route(&RouteTable::new(vec![RouteRelease::new("r1", 1, &[backend.addr])]).unwrap());
    let router = Workers::start(WorkersConfig {
        threads: 2,
        pin: false,
    })
    .unwrap();
    let bind = |addr: &str| {
        let mut listen = ListenerConfig::new(addr.parse().unwrap());
        listen.reuse_port = true;
        Listener::bind(listen, vec![Arc::clone(&shop)])
    };
    let old = bind("127.0.0.1:0").await.unwrap();
    let addr = old.local_addr().unwrap();
    let socket = old.socket_copy().unwrap();
    let old = router.serve(old).unwrap();
    // Keeps the old listener draining after it stops.
    let mut slow = Client::connect(addr).await;
    let hung = tokio::spawn(async move { slow.get("/hang").await });

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let stop = Arc::clone(&stop);
        loaders.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0_u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match one_shot(addr).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = Listener::bind_to(ListenerConfig::new(addr), vec![Arc::clone(&shop)], socket)
        .await
        .unwrap();
    let new = router.serve(new).unwrap();
    let draining = tokio::spawn(old.drain());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for loader in loaders {
        let (o, f) = loader.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    eprintln!("{ok} one-shot requests ok, {} failed", failed.len());
    assert!(ok > 100, "the load barely ran: {ok}");
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    draining.await.unwrap();
    hung.abort();
    drop(new);
}
