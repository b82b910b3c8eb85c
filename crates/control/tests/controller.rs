//! The controller over the in-memory fake provider, a real ledger file and a real router:
//! apply, rolling update, warm rollback, drift and crash replacement, scale, down, restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use kiln_control::{ApplyRequest, Controller, ControllerConfig, ReleaseConfig};
use kiln_runtime::{DriftFinding, FakeProvider, InstanceId, Provider};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(port: u16, env: &str) -> ReleaseConfig {
    let src = format!(
        "name = \"web\"\n[image]\n[service]\nreplicas = 2\nenv = {{ V = \"{env}\" }}\n\
         [deploy]\nkeep_previous = \"10m\"\n[route]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let spec = kiln_spec::Spec::parse(&src, "kiln.toml", std::path::Path::new(".")).unwrap();
    ReleaseConfig::from_spec(&spec)
}

fn apply_req(cfg: ReleaseConfig, image: &str) -> ApplyRequest {
    ApplyRequest {
        image: format!("sha256:{}", image.repeat(64 / image.len())),
        config: cfg,
        spec_digest: "sha256:spec".into(),
        source_commit: None,
        actor: "test".into(),
    }
}

async fn settle(c: &Controller, app: &str, phase: &str) -> kiln_control::AppStatus {
    for _ in 0..200 {
        c.reconcile().await.unwrap();
        let s = c.status(app).await.unwrap();
        let routed = s.instances.iter().filter(|i| i.routed).count();
        if s.phase == phase
            && s.instances.iter().all(|i| i.health != "starting")
            && routed == s.replicas as usize
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "{app} never reached {phase}: {:?}",
        c.status(app).await.unwrap()
    );
}

/// [`settle`], then until a listing no longer shows `gone`: a replaced instance is destroyed
/// in the background after its drain, and `status` reads the last listing, which may have
/// been taken before the destroy finished.
async fn settle_without(c: &Controller, app: &str, gone: &InstanceId) -> kiln_control::AppStatus {
    for _ in 0..200 {
        let s = settle(c, app, "completed").await;
        if !s.instances.iter().any(|i| i.id == gone.to_string()) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{gone} is still listed: {:?}", c.status(app).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_roll_rollback_heal_scale_down_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeProvider::new(true));
    let provider: Arc<dyn Provider> = fake.clone();
    let cfg = ControllerConfig {
        state_dir: dir.path().to_owned(),
        router: kiln_control::RouterChoice::Embedded(kiln_proxy::WorkersConfig::new(2)),
        attestations: None,
        policy: Default::default(),
    };
    let c = Controller::start(&cfg, Arc::clone(&provider))
        .await
        .unwrap();
    let port = free_port();

    // Release 1.
    let r1 = c
        .apply("web", apply_req(config(port, "1"), "a"))
        .await
        .unwrap();
    assert_eq!(r1.number, 1);
    let s = settle(&c, "web", "completed").await;
    assert_eq!(s.live, Some(1));
    assert_eq!(s.weights.get(&1), Some(&100));
    assert_eq!(s.instances.len(), 2);

    // A second apply while one is in progress is refused.
    let r2 = c
        .apply("web", apply_req(config(port, "2"), "b"))
        .await
        .unwrap();
    let err = c
        .apply("web", apply_req(config(port, "3"), "c"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in progress"), "{err}");
    let s = settle(&c, "web", "completed").await;
    assert_eq!((s.live, s.stable), (Some(r2.number), Some(1)));
    assert_eq!(s.weights.keys().copied().collect::<Vec<_>>(), [2]);
    // Release 1 stays warm, out of the route.
    assert_eq!(
        s.instances.iter().filter(|i| i.release == Some(1)).count(),
        2
    );
    assert!(
        s.instances
            .iter()
            .filter(|i| i.release == Some(1))
            .all(|i| !i.routed)
    );

    // Warm rollback: one swap.
    let rb = c.rollback("web", None, false, "test").await.unwrap();
    assert!(rb.warm);
    assert_eq!((rb.from, rb.to), (2, 1));
    let s = c.status("web").await.unwrap();
    assert_eq!(s.weights.keys().copied().collect::<Vec<_>>(), [1]);
    assert_eq!(s.live, Some(1));

    // A crashed instance is replaced; a drifted one too.
    let victim = InstanceId::new(&s.instances.iter().find(|i| i.routed).unwrap().id).unwrap();
    fake.exit(&victim, 137);
    let s = settle_without(&c, "web", &victim).await;
    assert!(!s.instances.iter().any(|i| i.id == victim.to_string()));
    assert_eq!(s.instances.iter().filter(|i| i.routed).count(), 2);
    let drifted = InstanceId::new(&s.instances.iter().find(|i| i.routed).unwrap().id).unwrap();
    // The run loop hears drift reports from the moment `run` is called.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(Arc::clone(&c).run(async {
        let _ = stopped.await;
    }));
    fake.drift(
        &drifted,
        vec![DriftFinding::Write {
            path: "/etc/evil".into(),
        }],
    );
    let recorded = || {
        c.events(Some("web"), None)
            .unwrap()
            .iter()
            .any(|e| e.kind == "instance.replaced" && e.data["instance"] == drifted.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while !recorded() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the drifted instance was not replaced");
    let _ = stop.send(());
    runner.await.unwrap();
    // Its destroy runs in the background after the event: wait for a listing without it.
    let s = settle_without(&c, "web", &drifted).await;
    assert!(
        !s.instances.iter().any(|i| i.id == drifted.to_string()),
        "{s:?}"
    );
    let kinds: Vec<String> = c
        .events(Some("web"), None)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"drift.detected".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"instance.replaced".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"rollback".to_owned()), "{kinds:?}");

    // Scale.
    c.scale("web", 3, "test").await.unwrap();
    let s = settle(&c, "web", "completed").await;
    assert_eq!(s.instances.iter().filter(|i| i.routed).count(), 3);

    // Restart: a new controller over the same state adopts everything.
    c.shutdown().await;
    drop(c);
    let c = Controller::start(&cfg, Arc::clone(&provider))
        .await
        .unwrap();
    let s = settle(&c, "web", "completed").await;
    assert_eq!(s.live, Some(1));
    assert_eq!(s.instances.iter().filter(|i| i.routed).count(), 3);
    assert!(c.verify().unwrap().is_ok());

    // Down destroys every instance.
    c.down("web", "test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(provider.list().await.unwrap().is_empty());
    assert!(c.status("web").await.is_err());
}

/// `web`-like config for app `name`, with `route` added to its `[route]` table (paths are
/// relative to `dir`).
fn config_for(dir: &std::path::Path, name: &str, port: u16, route: &str) -> ReleaseConfig {
    let src = format!(
        "name = \"{name}\"\n[image]\n[service]\nreplicas = 1\n\
         [route]\nlisten = \"127.0.0.1:{port}\"\n{route}\n"
    );
    let spec = kiln_spec::Spec::parse(&src, "kiln.toml", dir).unwrap();
    ReleaseConfig::from_spec(&spec)
}

/// A plain HTTP GET to the port: the reply, whatever it is (a TLS listener answers with a TLS
/// alert record, whose first byte is 0x15).
fn plain_get(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return "refused".to_owned();
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: web.example\r\nConnection: close\r\n\r\n");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

async fn controller(
    dir: &std::path::Path,
) -> (Arc<Controller>, ControllerConfig, Arc<dyn Provider>) {
    let provider: Arc<dyn Provider> = Arc::new(FakeProvider::new(true));
    let cfg = ControllerConfig {
        state_dir: dir.to_owned(),
        router: kiln_control::RouterChoice::Embedded(kiln_proxy::WorkersConfig::new(1)),
        attestations: None,
        policy: Default::default(),
    };
    let c = Controller::start(&cfg, Arc::clone(&provider))
        .await
        .unwrap();
    (c, cfg, provider)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_to_an_address_in_use_fails_and_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _, _) = controller(dir.path()).await;
    let port = free_port();
    // Limits the spec would refuse are refused through the API too.
    let mut tiny_heads = config(port, "1");
    tiny_heads.route.max_header_bytes = 100;
    let err = c
        .apply("web", apply_req(tiny_heads, "a"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("route.max_header_bytes"), "{err}");
    let other_process = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let err = c
        .apply("web", apply_req(config(port, "1"), "a"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(c.releases("web").unwrap().is_empty());
    assert!(c.status("web").await.is_err());

    drop(other_process);
    let r = c
        .apply("web", apply_req(config(port, "1"), "a"))
        .await
        .unwrap();
    assert_eq!(r.number, 1);
    settle(&c, "web", "completed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_finding_its_address_taken_serves_it_once_freed() {
    let dir = tempfile::tempdir().unwrap();
    let (c, cfg, provider) = controller(dir.path()).await;
    let port = free_port();
    c.apply("web", apply_req(config(port, "1"), "a"))
        .await
        .unwrap();
    settle(&c, "web", "completed").await;
    c.shutdown().await;
    drop(c);

    // Another process takes the address while the daemon is down.
    let other_process = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let c = Controller::start(&cfg, Arc::clone(&provider))
        .await
        .unwrap();
    let s = c.status("web").await.unwrap();
    let why = s.unserved.clone().unwrap_or_default();
    assert!(why.contains(&format!("127.0.0.1:{port}")), "{s:?}");
    // The app is still managed: its instances are kept as they are.
    c.reconcile().await.unwrap();
    assert!(c.status("web").await.unwrap().unserved.is_some());

    drop(other_process);
    // The address is free, but it is still web's: another app cannot take it before the
    // reconciler serves web again.
    let err = c
        .apply(
            "api",
            apply_req(config_for(dir.path(), "api", port, ""), "b"),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("web"), "{err}");
    c.reconcile().await.unwrap();
    let s = settle(&c, "web", "completed").await;
    assert_eq!(s.unserved, None);
    assert!(
        plain_get(port).starts_with("HTTP/1.1 "),
        "the router does not serve {port}"
    );
    let kinds: Vec<String> = c
        .events(Some("web"), None)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(
        kinds.contains(&"route.unserved".to_owned()) && kinds.contains(&"route.served".to_owned()),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_whose_address_is_taken_still_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    let (c, cfg, provider) = controller(dir.path()).await;
    let port = free_port();
    c.apply("web", apply_req(config(port, "1"), "a"))
        .await
        .unwrap();
    settle(&c, "web", "completed").await;
    c.shutdown().await;
    drop(c);
    let _other_process = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let c = Controller::start(&cfg, Arc::clone(&provider))
        .await
        .unwrap();
    assert!(c.status("web").await.unwrap().unserved.is_some());
    // Its passes go on without the router (nothing to publish to), and `down` stops it.
    c.reconcile().await.unwrap();
    assert_eq!(c.down("web", "test").await.unwrap(), 2);
    assert!(c.status("web").await.is_err());
    assert!(provider.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_kiln_cannot_take_a_share_of_an_address() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, _, _) = controller(one.path()).await;
    let (second, _, _) = controller(two.path()).await;
    let port = free_port();
    first
        .apply("web", apply_req(config(port, "1"), "a"))
        .await
        .unwrap();
    // Another state's router binding the same address would split its connections with the
    // first (SO_REUSEPORT); it is refused instead.
    let err = second
        .apply("web", apply_req(config(port, "1"), "a"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_on_one_address_share_its_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _, _) = controller(dir.path()).await;
    let port = free_port();
    let cert = rcgen::generate_simple_self_signed(vec!["web.example".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let tls = "[route.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"";
    let web = config_for(
        dir.path(),
        "web",
        port,
        &format!("hosts = [\"web.example\"]\n{tls}"),
    );
    c.apply("web", apply_req(web, "a")).await.unwrap();
    assert!(plain_get(port).starts_with('\u{15}'), "no TLS on {port}");

    // Plain HTTP on a TLS address would take TLS away from web.
    let plain_api = config_for(dir.path(), "api", port, "hosts = [\"api.example\"]");
    let err = c.apply("api", apply_req(plain_api, "b")).await.unwrap_err();
    assert!(err.to_string().contains("tls differs"), "{err}");
    assert!(c.releases("api").unwrap().is_empty());
    assert!(plain_get(port).starts_with('\u{15}'), "no TLS on {port}");

    // The same files are fine, and the address keeps them when one app leaves it.
    let api = config_for(
        dir.path(),
        "api",
        port,
        &format!("hosts = [\"api.example\"]\n{tls}"),
    );
    c.apply("api", apply_req(api, "b")).await.unwrap();
    c.down("api", "test").await.unwrap();
    let reply = plain_get(port);
    assert!(
        reply.starts_with('\u{15}'),
        "TLS lost when api left: {reply:?}"
    );
}
