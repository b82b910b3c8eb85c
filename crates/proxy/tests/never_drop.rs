//! End to end under real load (`wrk`, as a separate process): route switches, instance
//! removals with draining, and a SIGKILLed instance cost no request.
//!
//! `wrk` reports every non-2xx/3xx response and every socket error (connect, read, write,
//! timeout); each test asserts both are zero, and that the load really ran through the event
//! (a minimum of requests, and the event's own evidence) so the test cannot pass idle.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Wrk, app, router};
use kiln_proxy::{App, DrainOutcome, RouteRelease, RouteTable, render_prometheus};

fn table(releases: Vec<RouteRelease>) -> RouteTable {
    RouteTable::new(releases).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_route_switches_under_load_fail_no_request() {
    let (blue, green) = (Backend::start("blue").await, Backend::start("green").await);
    let shop = App::new(app("shop"));
    let to_blue = table(vec![RouteRelease::new("blue", 1, &[blue.addr])]);
    let to_green = table(vec![RouteRelease::new("green", 1, &[green.addr])]);
    shop.set_route(&to_blue);
    let router = router(vec![Arc::clone(&shop)]).await;
    let wrk = Wrk::start(&format!("http://{}/", router.addr), 16);
    blue.served_more_than(100).await;

    for switch in 0..1_000 {
        let (table, target) = if switch % 2 == 0 {
            (&to_green, &green)
        } else {
            (&to_blue, &blue)
        };
        let before = target.served();
        let change = shop.set_route(table);
        assert_eq!((change.added.len(), change.removed.len()), (1, 1));
        // Each switch waits for the new release to serve, so load runs through all of them.
        target.served_more_than(before).await;
    }

    let report = wrk.stop();
    assert!(report.requests >= 1_000, "{}", report.output);
    assert_eq!(report.non_2xx_3xx, 0, "{}", report.output);
    assert_eq!(report.socket_errors, 0, "{}", report.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_instance_removals_with_draining_fail_no_request() {
    let mut config = app("shop");
    config.drain_timeout = Duration::from_secs(30);
    let shop = App::new(config);
    let mut instances = vec![
        Backend::start("i0").await,
        Backend::start("i1").await,
        Backend::start("i2").await,
    ];
    let publish = |instances: &[Backend]| {
        let addrs: Vec<SocketAddr> = instances.iter().map(|b| b.addr).collect();
        shop.set_route(&table(vec![RouteRelease::new("r1", 1, &addrs)]))
    };
    publish(&instances);
    let router = router(vec![Arc::clone(&shop)]).await;
    // `/slow` holds every response 2 ms, so removed instances usually have requests in flight.
    let wrk = Wrk::start(&format!("http://{}/slow", router.addr), 16);
    instances[0].served_more_than(10).await;

    let mut removals_with_requests_in_flight = 0;
    for round in 0..100 {
        let fresh = Backend::start(&format!("i{}", round + 3)).await;
        instances.push(fresh);
        let retiring = instances.remove(0);
        let change = publish(&instances);
        assert_eq!(change.removed, [retiring.addr]);
        if shop.in_flight(retiring.addr) > 0 {
            removals_with_requests_in_flight += 1;
        }
        assert_eq!(shop.drain(retiring.addr).await, DrainOutcome::Drained);
        // Drained means stoppable: closing it now must not cut any request.
        retiring.stop();
        let newest = instances.last().unwrap();
        newest.served_more_than(0).await;
    }

    let report = wrk.stop();
    assert!(report.requests >= 1_000, "{}", report.output);
    assert_eq!(report.non_2xx_3xx, 0, "{}", report.output);
    assert_eq!(report.socket_errors, 0, "{}", report.output);
    assert!(
        removals_with_requests_in_flight > 0,
        "no removal had a request in flight, so draining was never exercised"
    );
}

/// A backend in its own process (this crate's `kiln-router backend`), so it can be SIGKILLed.
struct ChildBackend {
    child: Child,
    addr: SocketAddr,
}

impl ChildBackend {
    fn start(name: &str) -> ChildBackend {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-router"))
            .args(["backend", "--listen", "127.0.0.1:0", "--name", name])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .parse()
            .unwrap();
        ChildBackend { child, addr }
    }
}

impl Drop for ChildBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the release has answered more than `than` requests in the last minute. The
/// count lives in the router, which offers no notification, so this polls it briefly.
async fn answered_more_than(app: &App, release: &str, than: u64) -> u64 {
    for _ in 0..6_000 {
        let n = app
            .snapshot(release, Duration::from_secs(60))
            .unwrap()
            .requests;
        if n > than {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("release {release} did not pass {than} requests within a minute");
}

fn upstream_errors(app: &Arc<App>) -> u64 {
    render_prometheus(std::slice::from_ref(app))
        .lines()
        .filter(|l| l.starts_with("kiln_upstream_errors_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_instance_fails_no_idempotent_request() {
    let (mut doomed, survivor) = (
        ChildBackend::start("doomed"),
        ChildBackend::start("survivor"),
    );
    let shop = App::new(app("shop"));
    shop.set_route(&table(vec![RouteRelease::new(
        "r1",
        1,
        &[doomed.addr, survivor.addr],
    )]));
    let router = router(vec![Arc::clone(&shop)]).await;
    let wrk = Wrk::start(&format!("http://{}/", router.addr), 16);
    let before_kill = answered_more_than(&shop, "r1", 1_000).await;
    assert_eq!(upstream_errors(&shop), 0);

    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    // The dead instance stays in the route (no health check runs here), so every request that
    // picks it must be retried on the survivor.
    answered_more_than(&shop, "r1", before_kill + 3_000).await;

    let report = wrk.stop();
    assert_eq!(report.non_2xx_3xx, 0, "{}", report.output);
    assert_eq!(report.socket_errors, 0, "{}", report.output);
    assert!(
        upstream_errors(&shop) > 0,
        "the kill never disturbed a request, so nothing was retried"
    );
}
