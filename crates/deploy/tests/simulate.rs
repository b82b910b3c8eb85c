//! The rollout state machine driven through whole rollouts in a simulated world: a fake
//! executor applies every action at once, instances become healthy (or fail) on a script,
//! and time advances in 100 ms ticks. Each scenario checks the invariants on every tick and
//! pins its event timeline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_deploy::*;
use kiln_spec::{
    Analysis, CanaryStep, CountOrPercent, DeploySpec, OnInconclusive, Promote, Strategy,
};

const TICK: Millis = 100;

/// How instances of one release behave.
#[derive(Clone, Copy)]
struct Behavior {
    /// Healthy this long after creation; `None` = never (`dies` at `FAIL_AFTER`).
    ready_after: Option<Millis>,
    /// The health a never-healthy instance ends in.
    dies: Condition,
    error_rate: f64,
    p99_ms: f64,
}

const GOOD: Behavior = Behavior {
    ready_after: Some(300),
    dies: Condition::Failed,
    error_rate: 0.0,
    p99_ms: 4.0,
};
const FAIL_AFTER: Millis = 2_000;
/// Requests per second the simulated clients send.
const RPS: f64 = 200.0;

struct Sim {
    now: Millis,
    next_id: u32,
    instances: Vec<(InstanceObs, Millis)>,
    route: RouteTarget,
    behaviors: BTreeMap<u64, Behavior>,
    goal: Goal,
    state: RolloutState,
    timeline: Vec<String>,
    destroyed: u32,
    /// Migrate actions seen.
    migrations: u32,
    /// Clients send requests; without them every step measures nothing.
    traffic: bool,
    /// Passes whose decision changed the state: each is a document the controller stores
    /// and a `rollout.stored` entry in the ledger.
    changes: u32,
}

impl Sim {
    /// Release 1 running `replicas` healthy instances and fully routed; release 2 starts.
    fn new(deploy: DeploySpec, replicas: u32, new: Behavior) -> Sim {
        let mut sim = Sim {
            now: 1_000_000,
            next_id: 0,
            instances: Vec::new(),
            route: RouteTarget::default(),
            behaviors: BTreeMap::from([(1, GOOD), (2, new)]),
            goal: Goal {
                release: 2,
                stable: Some(1),
                replicas,
                deploy,
            },
            state: RolloutState::start(
                &Goal {
                    release: 2,
                    stable: Some(1),
                    replicas,
                    deploy: rolling(1, 0),
                },
                1_000_000,
            ),
            timeline: Vec::new(),
            destroyed: 0,
            migrations: 0,
            traffic: true,
            changes: 0,
        };
        for _ in 0..replicas {
            let id = sim.spawn(1);
            sim.instances.last_mut().unwrap().0.health = Condition::Healthy;
            sim.route.members.insert(id);
        }
        sim.route.weights.insert(1, 100);
        sim.state = RolloutState::start(&sim.goal, sim.now);
        sim
    }

    /// An app's first release: release 1 with nothing live before it.
    fn first(deploy: DeploySpec, replicas: u32) -> Sim {
        let mut sim = Sim::new(deploy, 0, GOOD);
        sim.route = RouteTarget::default();
        sim.goal.release = 1;
        sim.goal.stable = None;
        sim.goal.replicas = replicas;
        sim.state = RolloutState::start(&sim.goal, sim.now);
        sim
    }

    fn spawn(&mut self, release: u64) -> String {
        self.next_id += 1;
        let id = format!("i{:02}", self.next_id);
        self.instances.push((
            InstanceObs {
                id: id.clone(),
                release,
                health: Condition::Starting,
                drift: None,
            },
            self.now,
        ));
        id
    }

    fn observe(&self) -> Observed {
        Observed {
            instances: self.instances.iter().map(|(i, _)| i.clone()).collect(),
            route: self.route.clone(),
            metrics: self
                .state
                .step_started_ms
                .filter(|_| self.traffic)
                .map(|start| self.metrics(start)),
        }
    }

    /// What the router would have measured since `start` with the current weights.
    fn metrics(&self, start: Millis) -> StepMetrics {
        let secs = (self.now - start) as f64 / 1000.0;
        let window = |release: u64| {
            let w = f64::from(*self.route.weights.get(&release).unwrap_or(&0)) / 100.0;
            let b = self.behaviors[&release];
            let requests = (RPS * w * secs) as u64;
            Measurement {
                requests,
                errors: (requests as f64 * b.error_rate).round() as u64,
                p99_ms: if requests == 0 { 0.0 } else { b.p99_ms },
            }
        };
        StepMetrics {
            canary: window(2),
            stable: window(1),
        }
    }

    fn apply(&mut self, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Create { release, count } => {
                    for _ in 0..*count {
                        self.spawn(*release);
                    }
                }
                Action::Route(r) => self.route = r.clone(),
                Action::Migrate { release } => {
                    assert_eq!(*release, 2);
                    self.migrations += 1;
                }
                Action::Destroy { instance, .. } => {
                    self.route.members.remove(instance);
                    self.instances.retain(|(i, _)| &i.id != instance);
                    self.destroyed += 1;
                }
            }
        }
    }

    fn advance(&mut self) {
        self.now += TICK;
        let now = self.now;
        for (i, created) in &mut self.instances {
            if i.health != Condition::Starting {
                continue;
            }
            match self.behaviors[&i.release].ready_after {
                Some(after) if now - *created >= after => i.health = Condition::Healthy,
                None if now - *created >= FAIL_AFTER => i.health = self.behaviors[&i.release].dies,
                _ => {}
            }
        }
    }

    fn check_invariants(&self) {
        // Traffic only reaches instances that passed their health check.
        for m in &self.route.members {
            let (i, _) = self.instances.iter().find(|(i, _)| &i.id == m).unwrap();
            assert_eq!(
                i.health,
                Condition::Healthy,
                "{m} is routed but {:?}",
                i.health
            );
        }
        let total: u32 = self.route.weights.values().sum();
        assert!(
            total == 100 || total == 0,
            "weights {:?}",
            self.route.weights
        );
    }

    /// Runs until the rollout ends (or `limit` ms pass), recording events with their time.
    fn run(&mut self, limit: Millis, mut hook: impl FnMut(&mut Sim)) -> &Phase {
        let start = self.now;
        while self.now - start < limit {
            hook(self);
            let d = decide(&self.goal, &self.state, &self.observe(), self.now);
            for e in &d.events {
                let at = (self.now - start) as f64 / 1000.0;
                self.timeline.push(format!("{at:>5.1}s {}", describe(e)));
            }
            if d.state != self.state {
                self.changes += 1;
            }
            self.state = d.state;
            self.apply(&d.actions);
            self.check_invariants();
            if !matches!(self.state.phase, Phase::Progressing) {
                break;
            }
            self.advance();
        }
        &self.state.phase
    }

    fn count(&self, release: u64) -> usize {
        self.instances
            .iter()
            .filter(|(i, _)| i.release == release)
            .count()
    }
}

fn describe(e: &RolloutEvent) -> String {
    match e {
        RolloutEvent::StepStarted { step, weight } => format!("step {step} started at {weight}%"),
        RolloutEvent::StepJudged { step, verdict, .. } => format!("step {step} {verdict}"),
        RolloutEvent::StepInconclusive {
            inconclusive, then, ..
        } => format!("{inconclusive}; then {}", then.as_str()),
        RolloutEvent::AwaitingPromotion { inconclusive: None } => "awaiting kiln promote".into(),
        RolloutEvent::AwaitingPromotion {
            inconclusive: Some(why),
        } => format!("awaiting a decision: {why}"),
        RolloutEvent::Completed {
            release,
            shortcut: None,
        } => format!("completed release {release}"),
        RolloutEvent::Completed {
            release,
            shortcut: Some(why),
        } => format!("completed release {release} ({why})"),
        RolloutEvent::Aborted { reason } => format!("aborted: {reason}"),
        RolloutEvent::PreviousRetired { release } => format!("retired release {release}"),
    }
}

fn deploy(strategy: Strategy) -> DeploySpec {
    DeploySpec {
        strategy,
        max_surge: CountOrPercent::Count(1),
        max_unavailable: CountOrPercent::Count(0),
        progress_deadline: Duration::from_secs(10),
        keep_previous: Duration::from_secs(60),
        migrate: None,
    }
}

fn rolling(surge: u32, unavailable: u32) -> DeploySpec {
    DeploySpec {
        max_surge: CountOrPercent::Count(surge),
        max_unavailable: CountOrPercent::Count(unavailable),
        ..deploy(Strategy::Rolling)
    }
}

fn canary(promote: Promote) -> DeploySpec {
    canary_with(promote, OnInconclusive::Pause, false)
}

fn canary_with(
    promote: Promote,
    on_inconclusive: OnInconclusive,
    scale_stable: bool,
) -> DeploySpec {
    let step = |weight, pause: u64| CanaryStep {
        weight,
        pause: Some(Duration::from_secs(pause)),
    };
    deploy(Strategy::Canary {
        promote,
        steps: vec![step(10, 5), step(50, 5), step(100, 0)],
        analysis: Analysis {
            max_error_rate: 0.01,
            max_p99: Some(Duration::from_millis(300)),
            min_requests: 50,
            compare_to_stable: true,
            on_inconclusive,
        },
        scale_stable,
    })
}

#[test]
fn rolling_replaces_one_at_a_time_without_losing_capacity() {
    let mut sim = Sim::new(rolling(1, 0), 3, GOOD);
    let phase = sim.run(60_000, |s| {
        // With max_unavailable = 0, at least 3 ready instances are always routed.
        assert!(
            s.route.members.len() >= 3,
            "capacity fell to {:?}",
            s.route.members
        );
        // With max_surge = 1: new instances alive + stable still routed ≤ 4.
        let routed_stable = s
            .instances
            .iter()
            .filter(|(i, _)| i.release == 1 && s.route.members.contains(&i.id))
            .count();
        assert!(routed_stable + s.count(2) <= 4);
    });
    assert!(matches!(phase, Phase::Completed { .. }), "{phase:?}");
    assert_eq!(sim.timeline, ["  0.9s completed release 2"]);
    assert_eq!(sim.route.weights, BTreeMap::from([(2, 100)]));
    assert_eq!(sim.count(2), 3);
    // The previous release stays warm for an instant rollback.
    assert_eq!(sim.count(1), 3);
}

#[test]
fn rolling_with_unavailable_and_no_surge() {
    let mut sim = Sim::new(rolling(0, 1), 2, GOOD);
    let phase = sim.run(60_000, |s| {
        assert!(!s.route.members.is_empty());
        let routed_stable = s
            .instances
            .iter()
            .filter(|(i, _)| i.release == 1 && s.route.members.contains(&i.id))
            .count();
        assert!(routed_stable + s.count(2) <= 2);
    });
    assert!(matches!(phase, Phase::Completed { .. }), "{phase:?}");
}

#[test]
fn rolling_that_never_becomes_healthy_rolls_back_at_the_deadline() {
    let never = Behavior {
        ready_after: None,
        ..GOOD
    };
    let mut sim = Sim::new(rolling(1, 0), 2, never);
    let phase = sim.run(60_000, |_| {}).clone();
    let Phase::Aborted { reason, .. } = phase else {
        panic!("expected abort, got {phase:?}");
    };
    assert_eq!(
        reason,
        "progress deadline 10s exceeded: instance i07 of release 2 never became healthy"
    );
    // Stable got all the traffic back and kept its instances; new ones are gone.
    assert_eq!(sim.route.weights, BTreeMap::from([(1, 100)]));
    assert_eq!(sim.route.members.len(), 2);
    assert_eq!(sim.count(2), 0);
}

#[test]
fn blue_green_switches_once_when_all_green_is_ready() {
    let mut sim = Sim::new(
        deploy(Strategy::BlueGreen {
            promote: Promote::Auto,
        }),
        3,
        GOOD,
    );
    let mut switched = 0;
    let mut last = sim.route.weights.clone();
    let phase = sim.run(60_000, |s| {
        if s.route.weights.get(&2) == Some(&100) && last.get(&2) != Some(&100) {
            switched += 1;
        }
        // Before the switch, green never gets a share of the traffic.
        if s.route.weights.get(&1) == Some(&100) {
            assert!(s.route.weights.get(&2).is_none_or(|w| *w == 0));
        }
        last = s.route.weights.clone();
    });
    assert!(matches!(phase, Phase::Completed { .. }), "{phase:?}");
    assert_eq!(sim.route.weights, BTreeMap::from([(2, 100)]));
    assert_eq!(switched, 0, "the switch happens in the final decision");
    assert_eq!(sim.timeline, ["  0.3s completed release 2"]);
}

#[test]
fn blue_green_manual_waits_for_promote() {
    let mut sim = Sim::new(
        deploy(Strategy::BlueGreen {
            promote: Promote::Manual,
        }),
        2,
        GOOD,
    );
    sim.run(30_000, |_| {});
    assert!(matches!(sim.state.phase, Phase::Progressing));
    assert_eq!(sim.route.weights, BTreeMap::from([(1, 100), (2, 0)]));
    assert_eq!(
        sim.route.members.len(),
        4,
        "green is in the table for preview"
    );
    sim.state.promote_requested = true;
    let phase = sim.run(1_000, |_| {});
    assert!(matches!(phase, Phase::Completed { .. }), "{phase:?}");
    assert_eq!(
        sim.timeline,
        ["  0.3s awaiting kiln promote", "  0.0s completed release 2"]
    );
}

#[test]
fn blue_green_with_failing_health_never_gets_traffic() {
    let never = Behavior {
        ready_after: None,
        ..GOOD
    };
    let mut sim = Sim::new(
        deploy(Strategy::BlueGreen {
            promote: Promote::Auto,
        }),
        2,
        never,
    );
    let phase = sim
        .run(60_000, |s| {
            assert!(s.route.weights.get(&2).is_none_or(|w| *w == 0))
        })
        .clone();
    assert!(matches!(phase, Phase::Aborted { .. }), "{phase:?}");
}

#[test]
fn canary_of_a_good_version_promotes_through_every_step() {
    let mut sim = Sim::new(canary(Promote::Auto), 4, GOOD);
    let phase = sim.run(120_000, |_| {});
    assert!(matches!(phase, Phase::Completed { .. }), "{phase:?}");
    assert_eq!(
        sim.timeline,
        [
            "  0.3s step 1 started at 10%",
            "  5.3s step 1 passed: error rate 0.0% over 100 requests, p99 4ms",
            "  5.7s step 2 started at 50%",
            " 10.7s step 2 passed: error rate 0.0% over 500 requests, p99 4ms",
            " 11.1s completed release 2",
        ]
    );
    assert_eq!(sim.count(2), 4);
}

/// A canary's state changes when something happens (an instance ready, a step started or
/// judged, the end), not on each of the hundred passes spent in its pauses: each change is a
/// `rollout.stored` entry in the ledger, which grew by ten a second during a pause before.
#[test]
fn a_canary_pausing_between_steps_leaves_its_state_alone() {
    let mut sim = Sim::new(canary(Promote::Auto), 4, GOOD);
    let phase = sim.run(120_000, |_| {});
    assert!(matches!(phase, Phase::Completed { .. }), "{phase:?}");
    // 111 passes of 100 ms; the changes are the events above and instances becoming ready.
    assert!(
        sim.changes <= 20,
        "the state changed on {} passes",
        sim.changes
    );
}

#[test]
fn canary_failing_20_percent_aborts_at_the_first_step() {
    let bad = Behavior {
        error_rate: 0.2,
        ..GOOD
    };
    let mut sim = Sim::new(canary(Promote::Auto), 4, bad);
    let phase = sim.run(120_000, |_| {}).clone();
    assert!(matches!(phase, Phase::Aborted { .. }), "{phase:?}");
    assert_eq!(
        sim.timeline,
        [
            "  0.3s step 1 started at 10%",
            "  5.3s step 1 error rate 20.0% over 100 requests > 1.0%",
            "  5.3s aborted: aborted at step 1 (10%): error rate 20.0% over 100 requests > 1.0%",
        ]
    );
    assert_eq!(sim.route.weights, BTreeMap::from([(1, 100)]));
    assert_eq!(sim.count(2), 0);
}

#[test]
fn canary_200ms_slower_aborts_on_latency() {
    let slow = Behavior {
        p99_ms: 204.0,
        ..GOOD
    };
    let mut sim = Sim::new(canary(Promote::Auto), 2, slow);
    let Phase::Aborted { reason, .. } = sim.run(120_000, |_| {}).clone() else {
        panic!("expected abort");
    };
    assert_eq!(
        reason,
        "aborted at step 1 (10%): p99 204ms over 100 requests > stable's 4ms (tolerance 56ms)"
    );
}

#[test]
fn canary_without_traffic_is_inconclusive_then_fails_under_abort() {
    let mut sim = Sim::new(
        canary_with(Promote::Auto, OnInconclusive::Abort, false),
        2,
        GOOD,
    );
    sim.behaviors.insert(2, GOOD);
    // No clients: drive decisions with empty metrics.
    let start = sim.now;
    loop {
        let mut obs = sim.observe();
        obs.metrics = None;
        let d = decide(&sim.goal, &sim.state, &obs, sim.now);
        sim.state = d.state;
        sim.apply(&d.actions);
        if !matches!(sim.state.phase, Phase::Progressing) || sim.now - start > 60_000 {
            break;
        }
        sim.advance();
    }
    let Phase::Aborted { reason, .. } = &sim.state.phase else {
        panic!("expected abort, got {:?}", sim.state.phase);
    };
    assert_eq!(
        reason,
        "aborted at step 1 (10%): inconclusive: 0 requests in 15s, fewer than min_requests = 50"
    );
}

#[test]
fn canary_manual_waits_then_promote_skips_to_100() {
    let mut sim = Sim::new(canary(Promote::Manual), 2, GOOD);
    sim.run(30_000, |_| {});
    assert!(matches!(sim.state.phase, Phase::Progressing));
    assert!(
        sim.timeline
            .last()
            .unwrap()
            .ends_with("awaiting kiln promote")
    );
    assert_eq!(sim.route.weights, BTreeMap::from([(1, 50), (2, 50)]));
    sim.state.promote_requested = true;
    assert!(matches!(sim.run(5_000, |_| {}), Phase::Completed { .. }));
    assert_eq!(sim.route.weights, BTreeMap::from([(2, 100)]));
}

#[test]
fn kiln_abort_puts_all_traffic_back_on_stable() {
    let mut sim = Sim::new(canary(Promote::Auto), 2, GOOD);
    sim.run(7_000, |_| {});
    assert_eq!(sim.route.weights.get(&2), Some(&50));
    sim.state.abort_requested = Some("alice".into());
    sim.run(1_000, |_| {});
    assert_eq!(
        sim.state.phase,
        Phase::Aborted {
            at_ms: sim.now,
            reason: "aborted by alice".into()
        }
    );
    assert_eq!(sim.route.weights, BTreeMap::from([(1, 100)]));
    assert_eq!(sim.count(2), 0);
}

#[test]
fn restart_mid_step_continues_from_persisted_state() {
    // A daemon killed mid-step restarts with the persisted state and the world as it is: the
    // rollout continues where it was, with the same step timing. (The state is all `decide`
    // remembers; its stored form and round trip are the control crate's, `doc.rs`.)
    let mut sim = Sim::new(canary(Promote::Auto), 2, GOOD);
    sim.run(3_000, |_| {});
    let persisted = sim.state.clone();
    sim.state = persisted;
    let phase = sim.run(120_000, |_| {});
    assert!(matches!(phase, Phase::Completed { .. }), "{phase:?}");
    assert_eq!(sim.timeline[0], "  0.3s step 1 started at 10%");
    assert!(
        sim.timeline[1].starts_with("  2.3s step 1 passed"),
        "{:?}",
        sim.timeline
    );
}

#[test]
fn decide_is_idempotent_when_nothing_changed() {
    let mut sim = Sim::new(rolling(1, 0), 2, GOOD);
    sim.run(1_000, |_| {});
    let obs = sim.observe();
    let a = decide(&sim.goal, &sim.state, &obs, sim.now);
    let b = decide(&sim.goal, &sim.state, &obs, sim.now);
    assert_eq!(a, b);
}

#[test]
fn steady_state_replaces_failures_and_drift_and_retires_previous() {
    let mut sim = Sim::new(rolling(1, 0), 2, GOOD);
    assert!(matches!(sim.run(60_000, |_| {}), Phase::Completed { .. }));
    let tick = |sim: &mut Sim| {
        let d = decide(&sim.goal, &sim.state, &sim.observe(), sim.now);
        for e in &d.events {
            sim.timeline.push(describe(e));
        }
        sim.state = d.state;
        sim.apply(&d.actions);
        sim.check_invariants();
        sim.advance();
    };
    // A crashed instance is replaced.
    let victim = sim.route.members.iter().next().unwrap().clone();
    sim.instances
        .iter_mut()
        .find(|(i, _)| i.id == victim)
        .unwrap()
        .0
        .health = Condition::Failed;
    for _ in 0..10 {
        tick(&mut sim);
    }
    assert!(!sim.instances.iter().any(|(i, _)| i.id == victim));
    assert_eq!(sim.route.members.len(), 2);
    // A drifted one keeps serving until its replacement is ready, then goes.
    let drifted = sim.route.members.iter().next().unwrap().clone();
    sim.instances
        .iter_mut()
        .find(|(i, _)| i.id == drifted)
        .unwrap()
        .0
        .drift = Some("/etc/passwd written".into());
    for _ in 0..10 {
        tick(&mut sim);
        assert!(!sim.route.members.is_empty());
    }
    assert!(!sim.instances.iter().any(|(i, _)| i.id == drifted));
    assert_eq!(sim.route.members.len(), 2);
    // After keep_previous, release 1's warm instances are retired.
    assert_eq!(sim.count(1), 2);
    sim.now += 60_000;
    tick(&mut sim);
    assert_eq!(sim.count(1), 0);
    assert_eq!(sim.timeline.last().unwrap(), "retired release 1");
}

/// The issue: a tampered layer every instance shares drifts them all at once; they left the
/// route together and requests were answered 503 until a replacement was ready.
#[test]
fn instances_all_drifted_at_once_serve_until_a_clean_one_is_ready() {
    let mut sim = Sim::new(rolling(1, 0), 2, GOOD);
    assert!(matches!(sim.run(60_000, |_| {}), Phase::Completed { .. }));
    let drifted: Vec<String> = sim.route.members.iter().cloned().collect();
    assert_eq!(drifted.len(), 2);
    for (i, _) in sim.instances.iter_mut() {
        if drifted.contains(&i.id) {
            i.drift = Some("layer sha256:aa /www/page.txt modified".into());
        }
    }
    let mut replaced_at = Vec::new();
    for tick in 0..40 {
        let d = decide(&sim.goal, &sim.state, &sim.observe(), sim.now);
        sim.state = d.state;
        sim.apply(&d.actions);
        sim.check_invariants();
        // Never an empty table: drifted instances serve until clean ones take over.
        assert!(!sim.route.members.is_empty(), "tick {tick}: empty route");
        let clean = |m: &String| {
            sim.instances
                .iter()
                .any(|(i, _)| &i.id == m && i.drift.is_none())
        };
        // Once a clean instance serves, no drifted one does.
        if sim.route.members.iter().any(clean) {
            assert!(sim.route.members.iter().all(clean), "{:?}", sim.route);
        }
        for id in &drifted {
            if !replaced_at.contains(id) && !sim.instances.iter().any(|(i, _)| &i.id == id) {
                replaced_at.push(id.clone());
            }
        }
        sim.advance();
    }
    assert_eq!(replaced_at.len(), 2, "both drifted instances were replaced");
    assert_eq!(sim.route.members.len(), 2);
    assert!(
        sim.instances.iter().all(|(i, _)| i.drift.is_none()),
        "only clean instances are left: {:?}",
        sim.instances
    );
}

fn with_migration(mut d: DeploySpec) -> DeploySpec {
    d.migrate = Some(kiln_spec::Migrate {
        command: vec!["/app".into(), "migrate".into()],
        schema: 3,
        compatible_from: 2,
        pause: false,
    });
    d
}

#[test]
fn migration_runs_before_any_new_instance_then_the_rollout_goes_on() {
    let mut sim = Sim::new(with_migration(rolling(1, 0)), 2, GOOD);
    // While the migration runs (the executor has not reported), nothing else happens.
    for _ in 0..5 {
        let d = decide(&sim.goal, &sim.state, &sim.observe(), sim.now);
        assert_eq!(d.actions, [Action::Migrate { release: 2 }]);
        sim.state = d.state;
        sim.advance();
    }
    sim.state.migrated = true;
    assert!(matches!(sim.run(60_000, |_| {}), Phase::Completed { .. }));
}

#[test]
fn failed_migration_aborts_without_touching_traffic() {
    let mut sim = Sim::new(with_migration(rolling(1, 0)), 2, GOOD);
    let before = sim.route.clone();
    sim.state.migration_failed = Some("exit 1: column exists".into());
    let Phase::Aborted { reason, .. } = sim.run(1_000, |_| {}).clone() else {
        panic!("expected abort");
    };
    assert_eq!(reason, "migration failed: exit 1: column exists");
    assert_eq!(sim.route, before);
    assert_eq!(sim.count(2), 0);
}

#[test]
fn sigkilled_instances_abort_the_rollout_naming_the_signal() {
    // Regression: a SIGKILLed instance was reported as "failed (exited or never became
    // healthy)", with no word of the signal.
    let killed = Behavior {
        ready_after: None,
        dies: Condition::Exited { code: Some(137) },
        ..GOOD
    };
    let mut sim = Sim::new(rolling(1, 0), 2, killed);
    let Phase::Aborted { reason, .. } = sim.run(60_000, |_| {}).clone() else {
        panic!("expected abort");
    };
    assert_eq!(
        reason,
        "progress deadline 10s exceeded: instance i07 of release 2 killed by signal 9 (SIGKILL)"
    );
    assert_eq!(sim.route.weights, BTreeMap::from([(1, 100)]));
}

/// One instance in a destroy-reason fixture: id, release, health, drift.
type Inst = (&'static str, u64, Condition, Option<&'static str>);

/// Checks what `decide` destroys, in order, and the `last_failure` it records, for release 2
/// replacing release 1 (2 replicas, `keep_previous` 60s) in `phase`, at 100s (the rollout
/// started at 99s, so its progress deadline is far).
#[track_caller]
fn check_destroys(
    phase: Phase,
    instances: &[Inst],
    want: &[(&str, DestroyReason)],
    last_failure: Option<&str>,
) {
    let goal = Goal {
        release: 2,
        stable: Some(1),
        replicas: 2,
        deploy: rolling(1, 0),
    };
    let mut state = RolloutState::start(&goal, 99_000);
    state.phase = phase;
    let obs = Observed {
        instances: instances
            .iter()
            .map(|&(id, release, health, drift)| InstanceObs {
                id: id.into(),
                release,
                health,
                drift: drift.map(Into::into),
            })
            .collect(),
        ..Observed::default()
    };
    let d = decide(&goal, &state, &obs, 100_000);
    let got: Vec<(&str, &DestroyReason)> = d
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Destroy { instance, reason } => Some((instance.as_str(), reason)),
            _ => None,
        })
        .collect();
    let want: Vec<(&str, &DestroyReason)> = want.iter().map(|(i, r)| (*i, r)).collect();
    assert_eq!(got, want);
    assert_eq!(d.state.last_failure.as_deref(), last_failure);
}

#[test]
fn every_destroy_names_its_reason() {
    use Condition::{Exited, Failed, Healthy, Starting, Unhealthy};
    use DestroyReason as R;
    let done = || Phase::Completed { at_ms: 90_000 };
    let progressing = || Phase::Progressing;

    check_destroys(
        progressing(),
        &[("a", 2, Exited { code: Some(1) }, None)],
        &[(
            "a",
            R::Exited {
                release: 2,
                code: Some(1),
            },
        )],
        Some("instance a of release 2 exited with status 1"),
    );
    check_destroys(
        progressing(),
        &[("a", 2, Exited { code: Some(137) }, None)],
        &[(
            "a",
            R::Exited {
                release: 2,
                code: Some(137),
            },
        )],
        Some("instance a of release 2 killed by signal 9 (SIGKILL)"),
    );
    check_destroys(
        done(),
        &[
            ("a", 2, Exited { code: None }, None),
            ("b", 2, Healthy, None),
        ],
        &[(
            "a",
            R::Exited {
                release: 2,
                code: None,
            },
        )],
        Some("instance a of release 2 exit status unknown"),
    );
    check_destroys(
        progressing(),
        &[("a", 2, Failed, None), ("b", 2, Starting, None)],
        &[("a", R::NeverHealthy { release: 2 })],
        Some("instance a of release 2 never became healthy"),
    );
    check_destroys(
        done(),
        &[("a", 2, Unhealthy, None), ("b", 2, Healthy, None)],
        &[("a", R::Unhealthy { release: 2 })],
        Some("instance a of release 2 became unhealthy"),
    );
    // A drifted instance goes only once a clean one is ready to take its traffic.
    let drifted = ("a", 2, Healthy, Some("/etc/passwd written"));
    check_destroys(
        done(),
        &[drifted, ("b", 2, Healthy, None)],
        &[(
            "a",
            R::Drifted {
                release: 2,
                findings: "/etc/passwd written".into(),
            },
        )],
        None,
    );
    check_destroys(done(), &[drifted, ("b", 2, Starting, None)], &[], None);
    check_destroys(
        done(),
        &[
            ("a", 2, Healthy, None),
            ("b", 2, Healthy, None),
            ("c", 0, Healthy, None),
        ],
        &[("c", R::Superseded { release: 0 })],
        None,
    );
    check_destroys(
        Phase::Aborted {
            at_ms: 0,
            reason: "aborted by alice".into(),
        },
        &[
            ("a", 2, Healthy, None),
            ("b", 2, Failed, None),
            ("c", 1, Healthy, None),
        ],
        &[
            ("b", R::NeverHealthy { release: 2 }),
            ("a", R::Aborted { release: 2 }),
        ],
        Some("instance b of release 2 never became healthy"),
    );
    check_destroys(
        done(),
        &[
            ("a", 2, Healthy, None),
            ("b", 2, Healthy, None),
            ("c", 2, Healthy, None),
        ],
        &[(
            "c",
            R::ScaledDown {
                release: 2,
                replicas: 2,
            },
        )],
        None,
    );
    check_destroys(
        Phase::Completed { at_ms: 0 },
        &[
            ("a", 2, Healthy, None),
            ("b", 2, Healthy, None),
            ("c", 1, Healthy, None),
        ],
        &[(
            "c",
            R::Retired {
                release: 1,
                kept: Duration::from_secs(60),
            },
        )],
        None,
    );
}

#[test]
fn destroy_reasons_read_as_text() {
    use DestroyReason as R;
    let exited = |code| R::Exited { release: 2, code };
    #[rustfmt::skip]
    let cases = [
        (exited(Some(0)), "exited with status 0", true),
        (exited(Some(1)), "exited with status 1", true),
        (exited(Some(128)), "exited with status 128", true),
        (exited(Some(129)), "killed by signal 1 (SIGHUP)", true),
        (exited(Some(130)), "killed by signal 2 (SIGINT)", true),
        (exited(Some(131)), "killed by signal 3 (SIGQUIT)", true),
        (exited(Some(134)), "killed by signal 6 (SIGABRT)", true),
        (exited(Some(137)), "killed by signal 9 (SIGKILL)", true),
        (exited(Some(139)), "killed by signal 11 (SIGSEGV)", true),
        (exited(Some(141)), "killed by signal 13 (SIGPIPE)", true),
        (exited(Some(143)), "killed by signal 15 (SIGTERM)", true),
        (exited(Some(138)), "killed by signal 10", true),
        (exited(Some(192)), "killed by signal 64", true),
        (exited(Some(193)), "exited with status 193", true),
        (exited(Some(255)), "exited with status 255", true),
        (exited(Some(-1)), "exited with status -1", true),
        (exited(None), "exit status unknown", true),
        (R::NeverHealthy { release: 2 }, "never became healthy", true),
        (R::Unhealthy { release: 2 }, "became unhealthy", true),
        (R::Drifted { release: 2, findings: "/etc/passwd written".into() },
            "drifted: /etc/passwd written", true),
        (R::Superseded { release: 2 }, "release 2 is neither live nor previous", false),
        (R::Aborted { release: 2 }, "release 2 was aborted", false),
        (R::ScaledDown { release: 2, replicas: 2 }, "scaled to 2 replicas", false),
        (R::Retired { release: 2, kept: Duration::from_secs(600) },
            "release 2 stayed warm for 10m", false),
        (R::Retired { release: 2, kept: Duration::from_secs(90) },
            "release 2 stayed warm for 90s", false),
    ];
    for (reason, text, replacement) in cases {
        assert_eq!(reason.to_string(), text, "{reason:?}");
        assert_eq!(reason.is_replacement(), replacement, "{reason:?}");
        assert_eq!(reason.release(), 2, "{reason:?}");
    }
}

#[test]
fn steady_route_is_the_table_a_completed_rollout_publishes() {
    use Condition::{Healthy, Starting};
    let goal = Goal {
        release: 2,
        stable: Some(1),
        replicas: 2,
        deploy: rolling(1, 0),
    };
    let mut state = RolloutState::start(&goal, 0);
    state.phase = Phase::Completed { at_ms: 0 };
    let inst = |id: &str, release, health, drift: Option<&str>| InstanceObs {
        id: id.into(),
        release,
        health,
        drift: drift.map(Into::into),
    };
    let obs = Observed {
        // Listed out of order: the table takes the lowest ready ids, up to `replicas`.
        instances: vec![
            inst("e", 2, Healthy, None),
            inst("a", 2, Healthy, Some("/etc/passwd written")),
            inst("d", 2, Healthy, None),
            inst("b", 2, Starting, None),
            inst("c", 2, Healthy, None),
            inst("s", 1, Healthy, None),
        ],
        ..Observed::default()
    };
    let table = steady_route(&goal, &obs);
    assert_eq!(table.weights, BTreeMap::from([(2, 100)]));
    assert_eq!(
        table.members,
        ["c", "d"].into_iter().map(String::from).collect()
    );
    let d = decide(&goal, &state, &obs, 1_000);
    assert_eq!(d.actions.first(), Some(&Action::Route(table.clone())));
    // Once published, the steady state has nothing to change in the table.
    let obs = Observed {
        route: table,
        ..obs
    };
    let d = decide(&goal, &state, &obs, 1_000);
    assert!(!d.actions.iter().any(|a| matches!(a, Action::Route(_))));
}

#[test]
fn a_first_release_goes_straight_to_100_whatever_the_strategy() {
    let first = "completed release 1 (first release: no live release to compare with)";
    for (deploy, done) in [
        (canary(Promote::Auto), first),
        (canary(Promote::Manual), first),
        (
            deploy(Strategy::BlueGreen {
                promote: Promote::Manual,
            }),
            first,
        ),
        // Rolling has no steps to skip: it completes as it always did.
        (rolling(1, 0), "completed release 1"),
    ] {
        let mut sim = Sim::first(deploy, 3);
        sim.traffic = false;
        let phase = sim.run(60_000, |s| {
            // Nothing else serves: new instances are routed as soon as they are ready.
            assert!(s.route.weights.values().all(|w| *w == 100 || *w == 0));
        });
        assert!(matches!(phase, Phase::Completed { .. }), "{phase:?}");
        assert_eq!(sim.timeline, [format!("  0.3s {done}")]);
        assert_eq!(sim.route.weights, BTreeMap::from([(1, 100)]));
        assert_eq!(sim.route.members.len(), 3);
    }
}

/// The issue: with no traffic, a canary could never finish a step; it aborted.
#[test]
fn canary_without_traffic_pauses_for_a_decision_then_promote_finishes_it() {
    let mut sim = Sim::new(canary(Promote::Auto), 2, GOOD);
    sim.traffic = false;
    // Far past the progress deadline (10s): waiting for a person is not a lack of progress.
    let phase = sim.run(60_000, |_| {}).clone();
    assert_eq!(phase, Phase::Progressing);
    assert_eq!(
        sim.timeline,
        [
            "  0.3s step 1 started at 10%",
            " 15.3s step 1 (10%) inconclusive: 0 of 50 requests needed in 15s; then pause",
            " 15.3s awaiting a decision: step 1 (10%) inconclusive: 0 of 50 requests needed in 15s",
        ]
    );
    assert!(sim.state.awaiting_promotion);
    assert_eq!(
        sim.state.inconclusive.map(|i| i.to_string()).as_deref(),
        Some("step 1 (10%) inconclusive: 0 of 50 requests needed in 15s")
    );
    // It holds the step's table.
    assert_eq!(sim.route.weights, BTreeMap::from([(1, 90), (2, 10)]));
    sim.state.promote_requested = true;
    assert!(matches!(sim.run(5_000, |_| {}), Phase::Completed { .. }));
    assert_eq!(sim.route.weights, BTreeMap::from([(2, 100)]));
    assert!(!sim.state.awaiting_promotion);
    assert_eq!(sim.state.inconclusive, None);
}

#[test]
fn canary_paused_on_inconclusive_aborts_on_kiln_abort() {
    let mut sim = Sim::new(canary(Promote::Auto), 2, GOOD);
    sim.traffic = false;
    sim.run(20_000, |_| {});
    assert!(sim.state.inconclusive.is_some());
    sim.state.abort_requested = Some("alice".into());
    let Phase::Aborted { reason, .. } = sim.run(1_000, |_| {}).clone() else {
        panic!("expected abort");
    };
    assert_eq!(reason, "aborted by alice");
    assert_eq!(sim.route.weights, BTreeMap::from([(1, 100)]));
    assert_eq!(sim.state.inconclusive, None);
}

#[test]
fn canary_promoted_on_inconclusive_walks_every_step_and_says_so() {
    let mut sim = Sim::new(
        canary_with(Promote::Auto, OnInconclusive::Promote, false),
        2,
        GOOD,
    );
    sim.traffic = false;
    assert!(matches!(sim.run(60_000, |_| {}), Phase::Completed { .. }));
    assert_eq!(
        sim.timeline,
        [
            "  0.3s step 1 started at 10%",
            " 15.3s step 1 (10%) inconclusive: 0 of 50 requests needed in 15s; then promote",
            " 15.4s step 2 started at 50%",
            " 30.4s step 2 (50%) inconclusive: 0 of 50 requests needed in 15s; then promote",
            " 30.8s completed release 2",
        ]
    );
}

#[test]
fn a_step_short_of_requests_extends_until_it_has_them() {
    // At 10% of 4 replicas the canary gets 20 requests a second: 150 take 7.5s, longer than
    // the 5s pause but within three of them.
    let mut sim = Sim::new(canary(Promote::Auto), 4, GOOD);
    if let Strategy::Canary { analysis, .. } = &mut sim.goal.deploy.strategy {
        analysis.min_requests = 150;
    }
    assert!(matches!(sim.run(120_000, |_| {}), Phase::Completed { .. }));
    assert_eq!(
        sim.timeline[..2],
        [
            "  0.3s step 1 started at 10%",
            "  7.8s step 1 passed: error rate 0.0% over 150 requests, p99 4ms",
        ]
    );
}

#[test]
fn stable_needed_follows_its_share_of_the_route() {
    for (replicas, stable_weight, want) in [
        (4, 100, 4),
        (4, 90, 4),
        (4, 50, 2),
        (3, 50, 2),
        (10, 1, 1),
        (1, 50, 1),
        (4, 0, 0),
    ] {
        assert_eq!(
            stable_needed(replicas, stable_weight),
            want,
            "{replicas} replicas, stable at {stable_weight}%"
        );
    }
}

/// Stable instances of release 1 that are alive.
fn stable_alive(s: &Sim) -> usize {
    s.instances
        .iter()
        .filter(|(i, _)| i.release == 1 && i.health == Condition::Healthy)
        .count()
}

#[test]
fn scale_stable_shrinks_stable_as_the_canary_grows_never_below_its_share() {
    let mut sim = Sim::new(
        canary_with(Promote::Auto, OnInconclusive::Pause, true),
        4,
        GOOD,
    );
    let mut seen = Vec::new();
    let phase = sim.run(120_000, |s| {
        let stable_weight = s.route.weights.get(&1).copied().unwrap_or(0);
        let routed_stable = s
            .instances
            .iter()
            .filter(|(i, _)| i.release == 1 && s.route.members.contains(&i.id))
            .count();
        assert!(
            routed_stable >= stable_needed(4, stable_weight) as usize,
            "{routed_stable} stable routed at {stable_weight}%"
        );
        if seen.last() != Some(&stable_alive(s)) {
            seen.push(stable_alive(s));
        }
    });
    assert!(matches!(phase, Phase::Completed { .. }), "{phase:?}");
    // 4 at 90%, 2 at 50%; what is left stays warm for `keep_previous`.
    assert_eq!(seen, [4, 2]);
    assert_eq!(sim.count(1), 2);
    assert_eq!(sim.count(2), 4);
}

#[test]
fn scale_stable_off_keeps_every_stable_instance() {
    let mut sim = Sim::new(canary(Promote::Auto), 4, GOOD);
    sim.run(120_000, |s| assert_eq!(stable_alive(s), 4));
    assert!(matches!(sim.state.phase, Phase::Completed { .. }));
}

#[test]
fn scale_stable_is_restored_when_the_canary_aborts() {
    let mut sim = Sim::new(
        canary_with(Promote::Auto, OnInconclusive::Pause, true),
        4,
        GOOD,
    );
    sim.run(7_000, |_| {});
    assert_eq!(sim.route.weights.get(&2), Some(&50));
    assert_eq!(sim.count(1), 2);
    sim.state.abort_requested = Some("alice".into());
    sim.run(1_000, |_| {});
    assert!(matches!(sim.state.phase, Phase::Aborted { .. }));
    for _ in 0..10 {
        let d = decide(&sim.goal, &sim.state, &sim.observe(), sim.now);
        sim.state = d.state;
        sim.apply(&d.actions);
        sim.check_invariants();
        // Never less than the two stable instances that carried its share.
        assert!(sim.route.members.len() >= 2);
        sim.advance();
    }
    assert_eq!(sim.count(1), 4);
    assert_eq!(sim.count(2), 0);
    assert_eq!(sim.route.weights, BTreeMap::from([(1, 100)]));
    assert_eq!(sim.route.members.len(), 4);
}
