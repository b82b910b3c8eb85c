//! The controller's timelines on tokio's paused time: the controller reads a `TokioClock`,
//! so a test advances time instead of sleeping, and asserts what happened at each moment
//! (crash → replaced, drift → replaced, progress deadline → aborted, keep_previous →
//! retired). Over the in-memory fake provider, a real ledger and a real router.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use kiln_control::{ApplyRequest, Controller, ControllerConfig, ReleaseConfig, TokioClock};
use kiln_ledger::{Cause, Event};
use kiln_runtime::{DriftFinding, FakeProvider, Health, InstanceId, Provider};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn request(port: u16, version: &str, deploy: &str) -> ApplyRequest {
    let src = format!(
        "name = \"web\"\n[image]\n[service]\nreplicas = 2\nenv = {{ V = \"{version}\" }}\n\
         [deploy]\n{deploy}\n[route]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let spec = kiln_spec::Spec::parse(&src, "kiln.toml", std::path::Path::new(".")).unwrap();
    let image = if version == "1" { "a" } else { "b" };
    ApplyRequest {
        image: format!("sha256:{}", image.repeat(64)),
        config: ReleaseConfig::from_spec(&spec),
        spec_digest: "sha256:spec".into(),
        source_commit: None,
        actor: "test".into(),
    }
}

struct Timeline {
    dir: tempfile::TempDir,
    fake: Arc<FakeProvider>,
    c: Arc<Controller>,
}

impl Timeline {
    async fn start(auto_healthy: bool) -> Timeline {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeProvider::new(auto_healthy));
        let c = Timeline::controller(&dir, &fake).await;
        Timeline { dir, fake, c }
    }

    async fn controller(dir: &tempfile::TempDir, fake: &Arc<FakeProvider>) -> Arc<Controller> {
        let provider: Arc<dyn Provider> = fake.clone();
        let cfg = ControllerConfig {
            state_dir: dir.path().to_owned(),
            router: kiln_control::RouterChoice::Embedded(kiln_proxy::WorkersConfig::new(1)),
            attestations: None,
            policy: Default::default(),
        };
        let clock = Arc::new(TokioClock::new());
        Controller::start_with_clock(&cfg, provider, clock)
            .await
            .unwrap()
    }

    /// A new controller over the same state directory and instances, as after a restart.
    async fn restart(&mut self) {
        self.c.shutdown().await;
        self.c = Timeline::controller(&self.dir, &self.fake).await;
    }

    /// One reconcile pass, then `by` of virtual time.
    async fn pass(&self, by: Duration) {
        self.c.reconcile().await.unwrap();
        // Background drains and destroys run on this runtime: let them.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tokio::time::advance(by).await;
    }

    /// Passes until `done`, at most `limit` of virtual time; returns the time it took.
    async fn until(
        &self,
        limit: Duration,
        done: impl Fn(&kiln_control::AppStatus) -> bool,
    ) -> Duration {
        let start = tokio::time::Instant::now();
        while start.elapsed() <= limit {
            self.pass(kiln_control::TICK).await;
            if done(&self.c.status("web").await.unwrap()) {
                return start.elapsed();
            }
        }
        panic!(
            "not reached within {limit:?}: {:?}",
            self.c.status("web").await.unwrap()
        );
    }

    fn events(&self) -> Vec<Event> {
        self.c
            .events(Some("web"), None)
            .unwrap()
            .iter()
            .map(|e| e.event().unwrap())
            .collect()
    }

    async fn routed(&self) -> Vec<InstanceId> {
        let s = self.c.status("web").await.unwrap();
        s.instances
            .iter()
            .filter(|i| i.routed)
            .map(|i| InstanceId::new(&i.id).unwrap())
            .collect()
    }
}

fn settled(s: &kiln_control::AppStatus) -> bool {
    s.phase == "completed" && s.instances.iter().filter(|i| i.routed).count() == 2
}

#[tokio::test(start_paused = true)]
async fn a_crashed_instance_is_replaced_on_the_next_pass_and_its_event_names_the_signal() {
    let t = Timeline::start(true).await;
    t.c.apply("web", request(free_port(), "1", ""))
        .await
        .unwrap();
    t.until(Duration::from_secs(5), settled).await;
    let victim = t.routed().await[0].clone();
    t.fake.exit(&victim, 137);
    t.pass(Duration::ZERO).await;
    // The same pass that saw the exit replaced it, in one event naming the signal.
    let replaced: Vec<Event> = t
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::InstanceReplaced { .. }))
        .collect();
    assert_eq!(
        replaced,
        [Event::InstanceReplaced {
            instance: victim.to_string(),
            release: Some(1),
            cause: Cause::Exited { code: Some(137) },
        }]
    );
    assert_eq!(
        replaced[0].to_string(),
        format!("{victim} killed by signal 9 (SIGKILL)")
    );
    let took = t
        .until(Duration::from_secs(5), |s| {
            settled(s) && !s.instances.iter().any(|i| i.id == victim.to_string())
        })
        .await;
    assert!(took <= Duration::from_secs(1), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_drifted_instance_is_recorded_then_replaced_once_a_clean_one_is_ready() {
    let t = Timeline::start(true).await;
    t.c.apply("web", request(free_port(), "1", ""))
        .await
        .unwrap();
    t.until(Duration::from_secs(5), settled).await;
    let runner = tokio::spawn(Arc::clone(&t.c).run(std::future::pending()));
    tokio::task::yield_now().await;
    let drifted = t.routed().await[0].clone();
    let finding = DriftFinding::Write {
        path: "/etc/passwd".into(),
    };
    t.fake.drift(&drifted, vec![finding]);
    // The run loop records the report as it arrives and replaces it on its next ticks.
    let start = tokio::time::Instant::now();
    loop {
        tokio::time::advance(kiln_control::TICK).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let s = t.c.status("web").await.unwrap();
        if settled(&s) && !s.instances.iter().any(|i| i.id == drifted.to_string()) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{s:?}");
    }
    runner.abort();
    let kinds: Vec<&'static str> = t
        .events()
        .iter()
        .filter(|e| e.is_drift())
        .map(Event::kind)
        .collect();
    assert_eq!(kinds, ["drift.detected", "instance.replaced"]);
}

#[tokio::test(start_paused = true)]
async fn a_rollout_that_never_becomes_healthy_aborts_at_its_progress_deadline() {
    let t = Timeline::start(false).await;
    let port = free_port();
    t.c.apply("web", request(port, "1", "")).await.unwrap();
    // The fake's instances stay `starting` until told: make release 1 healthy by hand.
    for _ in 0..3 {
        t.pass(kiln_control::TICK).await;
        for i in t.fake.list().await.unwrap() {
            t.fake.set_health(&i.id, Health::Healthy);
        }
    }
    t.until(Duration::from_secs(5), settled).await;
    t.c.apply("web", request(port, "2", "progress_deadline = \"10s\""))
        .await
        .unwrap();
    // Release 2's instances never become healthy.
    let took = t
        .until(Duration::from_secs(20), |s| s.phase == "aborted")
        .await;
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(11)).contains(&took),
        "aborted after {took:?}"
    );
    let s = t.c.status("web").await.unwrap();
    assert!(
        s.reason
            .as_deref()
            .unwrap_or("")
            .contains("progress deadline 10s"),
        "{s:?}"
    );
    assert_eq!(s.weights.keys().copied().collect::<Vec<_>>(), [1]);
}

#[tokio::test(start_paused = true)]
async fn the_previous_release_is_retired_when_keep_previous_ends() {
    let t = Timeline::start(true).await;
    let port = free_port();
    let keep = "keep_previous = \"2m\"";
    t.c.apply("web", request(port, "1", keep)).await.unwrap();
    t.until(Duration::from_secs(5), settled).await;
    t.c.apply("web", request(port, "2", keep)).await.unwrap();
    t.until(Duration::from_secs(5), |s| settled(s) && s.live == Some(2))
        .await;
    let warm =
        |s: &kiln_control::AppStatus| s.instances.iter().filter(|i| i.release == Some(1)).count();
    // Warm for the whole two minutes…
    let s = t.c.status("web").await.unwrap();
    assert_eq!(warm(&s), 2);
    tokio::time::advance(Duration::from_secs(119)).await;
    t.pass(Duration::ZERO).await;
    assert_eq!(warm(&t.c.status("web").await.unwrap()), 2);
    // …then retired.
    let took = t.until(Duration::from_secs(5), |s| warm(s) == 0).await;
    assert!(took <= Duration::from_secs(2), "{took:?}");
    assert!(
        t.events().contains(&Event::PreviousRetired { release: 1 }),
        "{:?}",
        t.events()
    );
}

#[tokio::test(start_paused = true)]
async fn rollback_returns_to_the_release_live_before_even_across_a_restart() {
    let mut t = Timeline::start(true).await;
    let port = free_port();
    for version in ["1", "2"] {
        t.c.apply("web", request(port, version, "")).await.unwrap();
        t.until(Duration::from_secs(5), settled).await;
    }
    // The history of live releases is on disk as soon as release 2 completed.
    t.restart().await;
    t.until(Duration::from_secs(5), |s| settled(s) && s.live == Some(2))
        .await;
    t.c.apply("web", request(port, "1", "")).await.unwrap();
    t.until(Duration::from_secs(5), |s| settled(s) && s.live == Some(3))
        .await;
    let back = t.c.rollback("web", None, false, "test").await.unwrap();
    assert_eq!((back.from, back.to), (3, 2));
}

/// The fake provider, with creates that take `delay` of (virtual) time, counted.
struct SlowCreates {
    fake: Arc<FakeProvider>,
    delay: Duration,
    creates: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl Provider for SlowCreates {
    fn name(&self) -> &'static str {
        "slow"
    }
    async fn create(
        &self,
        spec: kiln_runtime::InstanceSpec,
    ) -> Result<InstanceId, kiln_runtime::ProviderError> {
        self.creates
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.fake.create(spec).await
    }
    async fn start(&self, id: &InstanceId) -> Result<(), kiln_runtime::ProviderError> {
        self.fake.start(id).await
    }
    async fn stop(
        &self,
        id: &InstanceId,
        grace: Duration,
    ) -> Result<(), kiln_runtime::ProviderError> {
        self.fake.stop(id, grace).await
    }
    async fn destroy(&self, id: &InstanceId) -> Result<(), kiln_runtime::ProviderError> {
        self.fake.destroy(id).await
    }
    async fn observe(
        &self,
        id: &InstanceId,
    ) -> Result<kiln_runtime::Observation, kiln_runtime::ProviderError> {
        self.fake.observe(id).await
    }
    async fn list(&self) -> Result<Vec<kiln_runtime::Observation>, kiln_runtime::ProviderError> {
        self.fake.list().await
    }
    async fn logs(
        &self,
        id: &InstanceId,
        from: u64,
    ) -> Result<kiln_runtime::LogChunk, kiln_runtime::ProviderError> {
        self.fake.logs(id, from).await
    }
    async fn check_drift(
        &self,
        id: &InstanceId,
    ) -> Result<Option<kiln_runtime::DriftReport>, kiln_runtime::ProviderError> {
        self.fake.check_drift(id).await
    }
    fn drift_events(&self) -> tokio::sync::broadcast::Receiver<kiln_runtime::DriftReport> {
        self.fake.drift_events()
    }
    async fn health(
        &self,
        id: &InstanceId,
    ) -> Result<tokio::sync::watch::Receiver<Health>, kiln_runtime::ProviderError> {
        self.fake.health(id).await
    }
    async fn wait(&self, id: &InstanceId) -> Result<Option<i32>, kiln_runtime::ProviderError> {
        self.fake.wait(id).await
    }
}

/// A controller over a provider whose creates take `delay`.
async fn slow_controller(
    delay: Duration,
) -> (tempfile::TempDir, Arc<SlowCreates>, Arc<Controller>) {
    let dir = tempfile::tempdir().unwrap();
    let slow = Arc::new(SlowCreates {
        fake: Arc::new(FakeProvider::new(true)),
        delay,
        creates: std::sync::atomic::AtomicU32::new(0),
    });
    let provider: Arc<dyn Provider> = slow.clone();
    let cfg = ControllerConfig {
        state_dir: dir.path().to_owned(),
        router: kiln_control::RouterChoice::Embedded(kiln_proxy::WorkersConfig::new(1)),
        attestations: None,
        policy: Default::default(),
    };
    let c = Controller::start_with_clock(&cfg, provider, Arc::new(TokioClock::new()))
        .await
        .unwrap();
    (dir, slow, c)
}

#[tokio::test(start_paused = true)]
async fn a_slow_provider_neither_blocks_a_pass_nor_gets_more_creates_than_replicas() {
    let (_dir, slow, c) = slow_controller(Duration::from_secs(30)).await;
    c.apply("web", request(free_port(), "1", "")).await.unwrap();
    // Every pass returns without waiting for the 30 s creates, and status answers between.
    let start = tokio::time::Instant::now();
    for _ in 0..50 {
        c.reconcile().await.unwrap();
        assert_eq!(c.status("web").await.unwrap().phase, "progressing");
        tokio::time::advance(kiln_control::TICK).await;
    }
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    // Two replicas: the provider has been asked for one (they run one at a time), however
    // many passes ran meanwhile.
    assert_eq!(slow.creates.load(std::sync::atomic::Ordering::SeqCst), 1);
    // They finish one after the other; the rollout completes with exactly two instances.
    let mut passes = 0;
    loop {
        c.reconcile().await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let s = c.status("web").await.unwrap();
        if settled(&s) {
            assert_eq!(s.instances.len(), 2, "{s:?}");
            break;
        }
        passes += 1;
        assert!(passes < 2000, "{s:?}");
        tokio::time::advance(kiln_control::TICK).await;
    }
    assert_eq!(slow.creates.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn down_during_a_create_destroys_what_the_create_makes() {
    let (_dir, slow, c) = slow_controller(Duration::from_secs(3)).await;
    c.apply("web", request(free_port(), "1", "")).await.unwrap();
    // The pass launches both creates; neither has made its instance yet.
    c.reconcile().await.unwrap();
    tokio::task::yield_now().await;
    assert_eq!(slow.creates.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(slow.fake.list().await.unwrap().is_empty());
    // `down` now: it waits for them, then destroys what they made; nothing is left running.
    c.down("web", "test").await.unwrap();
    assert_eq!(slow.creates.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(slow.fake.list().await.unwrap(), Vec::new());
}

const CANARY: &str = "strategy = \"canary\"\n\
    [[deploy.steps]]\nweight = 50\npause = \"2s\"\n\
    [[deploy.steps]]\nweight = 100\n";

/// A canary's first release has nothing to compare with: live without steps, and the
/// event says why.
#[tokio::test(start_paused = true)]
async fn a_first_canary_release_goes_live_without_steps_and_says_why() {
    let t = Timeline::start(true).await;
    let port = free_port();
    t.c.apply("web", request(port, "1", CANARY)).await.unwrap();
    t.until(Duration::from_secs(5), settled).await;
    let events = t.events();
    assert!(
        events.contains(&Event::RolloutCompleted {
            release: 1,
            reason: Some("first release: no live release to compare with".into()),
        }),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::StepStarted { .. }))
    );
}

/// Without traffic, a step stays inconclusive: the rollout waits for a person, says why in
/// status, and `kiln promote` finishes it.
#[tokio::test(start_paused = true)]
async fn an_inconclusive_step_waits_for_a_decision_and_promote_finishes_it() {
    let t = Timeline::start(true).await;
    let port = free_port();
    t.c.apply("web", request(port, "1", CANARY)).await.unwrap();
    t.until(Duration::from_secs(5), settled).await;
    t.c.apply("web", request(port, "2", CANARY)).await.unwrap();
    t.until(Duration::from_secs(20), |s| s.awaiting_decision.is_some())
        .await;
    let s = t.c.status("web").await.unwrap();
    assert!(s.awaiting_promotion);
    assert_eq!(s.phase, "progressing");
    let why = s.awaiting_decision.unwrap();
    assert!(
        why.starts_with("step 1 (50%) inconclusive: 0 of 50 requests needed in 6"),
        "{why}"
    );
    // Well past the progress deadline it still waits, at the step's weights.
    tokio::time::advance(Duration::from_secs(600)).await;
    t.pass(kiln_control::TICK).await;
    let s = t.c.status("web").await.unwrap();
    assert_eq!(
        (s.phase.as_str(), s.weights.get(&2)),
        ("progressing", Some(&50))
    );
    t.c.promote("web", "test").await.unwrap();
    t.until(Duration::from_secs(5), |s| settled(s) && s.live == Some(2))
        .await;
    let s = t.c.status("web").await.unwrap();
    assert!(!s.awaiting_promotion && s.awaiting_decision.is_none());
}

/// `scale_stable`: release 1 gives up an instance while the canary holds half the traffic,
/// and gets it back, from its own image, when the canary is aborted.
#[tokio::test(start_paused = true)]
async fn scale_stable_gives_capacity_back_to_stable_when_the_canary_aborts() {
    let t = Timeline::start(true).await;
    let port = free_port();
    let spec = format!("{CANARY}scale_stable = true\n");
    let spec = spec.replacen(
        "\n[[deploy.steps]]",
        "\nscale_stable = true\n[[deploy.steps]]",
        1,
    );
    let spec = spec.trim_end_matches("scale_stable = true\n");
    t.c.apply("web", request(port, "1", spec)).await.unwrap();
    t.until(Duration::from_secs(5), settled).await;
    t.c.apply("web", request(port, "2", spec)).await.unwrap();
    let of = |s: &kiln_control::AppStatus, r: u64| {
        s.instances.iter().filter(|i| i.release == Some(r)).count()
    };
    // 2 replicas at 50%: one stable instance carries stable's half.
    t.until(Duration::from_secs(10), |s| {
        s.weights.get(&2) == Some(&50) && of(s, 1) == 1
    })
    .await;
    t.c.abort("web", "test").await.unwrap();
    t.until(Duration::from_secs(10), |s| {
        s.phase == "aborted" && of(s, 1) == 2 && of(s, 2) == 0
    })
    .await;
    for i in t.fake.list().await.unwrap() {
        let spec = t.fake.spec(&i.id).unwrap();
        assert_eq!(spec.image.to_string(), format!("sha256:{}", "a".repeat(64)));
        assert_eq!(spec.env.get("V").map(String::as_str), Some("1"));
    }
}
