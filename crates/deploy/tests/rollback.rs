//! Rollback decisions: the target `kiln rollback` picks, the checks that refuse it, the warm
//! swap and the cold rollout it starts, and a property check over random sequences of
//! applies and rollbacks against a model of which release was live before which.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln_deploy::*;
use kiln_spec::{CountOrPercent, DeploySpec, Migrate, Strategy};

const NOW: Millis = 1_000_000;

fn deploy(schema: Option<(u32, u32)>) -> DeploySpec {
    DeploySpec {
        strategy: Strategy::Rolling,
        max_surge: CountOrPercent::Count(1),
        max_unavailable: CountOrPercent::Count(0),
        progress_deadline: Duration::from_secs(10),
        keep_previous: Duration::from_secs(60),
        migrate: schema.map(|(schema, compatible_from)| Migrate {
            command: vec!["/app".into(), "migrate".into()],
            schema,
            compatible_from,
            pause: false,
        }),
    }
}

fn goal(release: u64, stable: Option<u64>) -> Goal {
    Goal {
        release,
        stable,
        replicas: 2,
        deploy: deploy(None),
    }
}

fn state(goal: &Goal, phase: Phase) -> RolloutState {
    RolloutState {
        phase,
        ..RolloutState::start(goal, 0)
    }
}

fn completed() -> Phase {
    Phase::Completed { at_ms: 0 }
}

fn aborted() -> Phase {
    Phase::Aborted {
        at_ms: 0,
        reason: "progress deadline 10s exceeded".into(),
    }
}

fn request(to: Option<u64>, force: bool) -> RollbackRequest {
    RollbackRequest {
        to,
        force,
        actor: "alice".into(),
    }
}

fn inst(id: &str, release: u64, health: Condition, drift: Option<&str>) -> InstanceObs {
    InstanceObs {
        id: id.into(),
        release,
        health,
        drift: drift.map(Into::into),
    }
}

/// Checks the target chosen for goal `release` (replacing `stable`) in `phase`.
#[track_caller]
fn check_target(
    phase: Phase,
    (release, stable): (u64, Option<u64>),
    history: &[u64],
    to: Option<u64>,
    want: Result<RollbackTarget, RollbackRefused>,
) {
    let goal = goal(release, stable);
    let got = rollback_target(&goal, &state(&goal, phase), history, &request(to, false));
    assert_eq!(got, want);
}

#[test]
fn rollback_target_in_every_phase() {
    use RollbackRefused as No;
    use RollbackTarget::{AbortRollout, Release};
    let progressing = || Phase::Progressing;

    // Completed: from the rolled-out release to the one live before it, or to `--to`.
    check_target(
        completed(),
        (3, Some(2)),
        &[1, 2, 3],
        None,
        Ok(Release { from: 3, to: 2 }),
    );
    check_target(
        completed(),
        (3, Some(2)),
        &[1, 2, 3],
        Some(1),
        Ok(Release { from: 3, to: 1 }),
    );
    check_target(
        completed(),
        (3, Some(2)),
        &[1, 2, 3],
        Some(3),
        Err(No::AlreadyLive { release: 3 }),
    );
    check_target(
        completed(),
        (1, None),
        &[1],
        None,
        Err(No::NoPrevious { live: 1 }),
    );
    check_target(
        completed(),
        (1, None),
        &[],
        None,
        Err(No::NoPrevious { live: 1 }),
    );
    // A history kept only since an upgrade falls back to the goal's stable release.
    check_target(
        completed(),
        (2, Some(1)),
        &[],
        None,
        Ok(Release { from: 2, to: 1 }),
    );
    check_target(
        completed(),
        (5, Some(4)),
        &[5],
        None,
        Ok(Release { from: 5, to: 4 }),
    );
    // Aborted: stable is live.
    check_target(aborted(), (1, None), &[], None, Err(No::NoLiveRelease));
    check_target(
        aborted(),
        (2, Some(1)),
        &[1],
        None,
        Err(No::NoPrevious { live: 1 }),
    );
    check_target(
        aborted(),
        (3, Some(2)),
        &[1, 2],
        None,
        Ok(Release { from: 2, to: 1 }),
    );
    // Progressing: rolling back is aborting, unless `--to` names another release.
    check_target(
        progressing(),
        (3, Some(2)),
        &[1, 2],
        None,
        Ok(AbortRollout { from: 3, to: 2 }),
    );
    check_target(
        progressing(),
        (3, Some(2)),
        &[1, 2],
        Some(2),
        Ok(AbortRollout { from: 3, to: 2 }),
    );
    check_target(
        progressing(),
        (1, None),
        &[],
        None,
        Ok(AbortRollout { from: 1, to: 1 }),
    );
    check_target(
        progressing(),
        (3, Some(2)),
        &[1, 2],
        Some(1),
        Err(No::InProgress { release: 3 }),
    );
}

#[test]
fn rollback_after_an_aborted_apply_skips_releases_that_were_never_live() {
    // Regression: the previous release was `from - 1`, here release 2, whose rollout was
    // aborted: it never served traffic. Live were 1, then 3; release 4 was just aborted.
    check_target(
        aborted(),
        (4, Some(3)),
        &[1, 3],
        None,
        Ok(RollbackTarget::Release { from: 3, to: 1 }),
    );
}

#[test]
fn rollback_after_a_rollback_goes_to_the_release_live_before() {
    // Regression: live were 1, 2, 5, then `kiln rollback --to 2`; release 6 was aborted.
    // The release live before 2 is 5, not `2 - 1`.
    check_target(
        aborted(),
        (6, Some(2)),
        &[1, 2, 5, 2],
        None,
        Ok(RollbackTarget::Release { from: 2, to: 5 }),
    );
    // And a second rollback right after a warm one returns to the release it left.
    check_target(
        completed(),
        (2, Some(5)),
        &[1, 2, 5, 2],
        None,
        Ok(RollbackTarget::Release { from: 2, to: 5 }),
    );
}

/// Release 3 is live (goal 3, stable 2); a rollback to release 2 with `target`'s settings,
/// the live `schema` and `obs`, at [`NOW`].
fn plan(
    target: TargetRelease,
    obs: &Observed,
    schema: Option<LiveSchema>,
    force: bool,
) -> Result<RollbackPlan, RollbackRefused> {
    plan_rollback(
        &goal(3, Some(2)),
        &target,
        3,
        obs,
        schema,
        &request(None, force),
        NOW,
    )
}

fn release_2(schema: Option<(u32, u32)>) -> TargetRelease {
    TargetRelease {
        number: 2,
        deploy: deploy(schema),
        same_route: true,
    }
}

/// The goal and state a rollback from 3 to 2 starts, `warm` or not.
fn rolled_back(schema: Option<(u32, u32)>, warm: bool) -> (Goal, RolloutState) {
    let goal = Goal {
        release: 2,
        stable: Some(3),
        replicas: 2,
        deploy: deploy(schema),
    };
    let mut state = RolloutState::start(&goal, NOW);
    state.migrated = true;
    if warm {
        state.phase = Phase::Completed { at_ms: NOW };
    }
    (goal, state)
}

/// Release 3's instances, and release 2's as listed.
fn world(release_2: &[InstanceObs]) -> Observed {
    let mut instances = vec![
        inst("x", 3, Condition::Healthy, None),
        inst("y", 3, Condition::Healthy, None),
    ];
    instances.extend_from_slice(release_2);
    Observed {
        instances,
        ..Observed::default()
    }
}

#[test]
fn warm_rollback_swaps_at_once_to_the_steady_table() {
    use Condition::{Healthy, Starting};
    // Listed out of order, one more ready than replicas, one drifted, one starting.
    let obs = world(&[
        inst("d", 2, Healthy, None),
        inst("a", 2, Healthy, Some("/etc/passwd written")),
        inst("c", 2, Healthy, None),
        inst("b", 2, Starting, None),
        inst("e", 2, Healthy, None),
    ]);
    let p = plan(release_2(None), &obs, None, false).unwrap();
    let (goal, state) = rolled_back(None, true);
    let route = RouteTarget {
        weights: BTreeMap::from([(2, 100)]),
        members: BTreeSet::from(["c".into(), "d".into()]),
    };
    assert_eq!(
        p,
        RollbackPlan {
            goal,
            state,
            warm: true,
            route: Some(route.clone()),
            forced: None,
        }
    );
    // The next decision keeps that table: the swap and the steady state agree.
    let after = Observed { route, ..obs };
    let d = decide(&p.goal, &p.state, &after, NOW + 100);
    assert!(
        !d.actions.iter().any(|a| matches!(a, Action::Route(_))),
        "{:?}",
        d.actions
    );
}

#[test]
fn cold_rollback_is_a_rollout_that_does_not_migrate_again() {
    use Condition::{Exited, Healthy, Starting};
    // Nothing ready: starting, drifted or dead instances do not make a rollback warm.
    for release_2_instances in [
        vec![],
        vec![inst("a", 2, Starting, None)],
        vec![inst("a", 2, Healthy, Some("/etc/passwd written"))],
        vec![inst("a", 2, Exited { code: Some(137) }, None)],
    ] {
        let obs = world(&release_2_instances);
        let p = plan(release_2(Some((2, 1))), &obs, None, false).unwrap();
        let (goal, state) = rolled_back(Some((2, 1)), false);
        assert_eq!(
            p,
            RollbackPlan {
                goal,
                state,
                warm: false,
                route: None,
                forced: None,
            },
            "{release_2_instances:?}"
        );
        let d = decide(&p.goal, &p.state, &obs, NOW);
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::Migrate { .. })),
            "{:?}",
            d.actions
        );
    }
}

/// Checks a rollback from 3 to `target` (which has a ready instance) against the live
/// `schema`: refused, or let through with what `--force` overrode.
#[track_caller]
fn check_allowed(
    target: TargetRelease,
    schema: Option<(u32, u32)>,
    force: bool,
    want: Result<Option<ForcedRollback>, RollbackRefused>,
) {
    let schema = schema.map(|(schema, compatible_from)| LiveSchema {
        schema,
        compatible_from,
        release: 3,
    });
    let obs = world(&[inst("a", 2, Condition::Healthy, None)]);
    let got = plan(target, &obs, schema, force).map(|p| {
        assert!(p.warm);
        p.forced
    });
    assert_eq!(got, want);
}

#[test]
fn rollback_checks_route_and_schema() {
    // Release 2's code works with schema 2 and later.
    let two = || release_2(Some((2, 1)));
    check_allowed(two(), Some((3, 2)), false, Ok(None));
    check_allowed(two(), None, false, Ok(None));
    let refused = RollbackRefused::Schema {
        release: 2,
        target_schema: 2,
        live_schema: 3,
        migrated_by: 3,
        compatible_from: 3,
    };
    check_allowed(two(), Some((3, 3)), false, Err(refused));
    check_allowed(
        two(),
        Some((3, 3)),
        true,
        Ok(Some(ForcedRollback {
            target_schema: 2,
            live_schema: 3,
        })),
    );
    // `--force` when nothing needs forcing records nothing.
    check_allowed(two(), Some((3, 2)), true, Ok(None));
    // As the controller does today, a release without [deploy.migrate] states no schema and
    // is let through.
    check_allowed(release_2(None), Some((3, 3)), false, Ok(None));
    check_allowed(
        TargetRelease {
            same_route: false,
            ..release_2(None)
        },
        None,
        true,
        Err(RollbackRefused::RouteChanged { release: 2 }),
    );
    check_allowed(
        TargetRelease {
            number: 3,
            ..release_2(None)
        },
        None,
        false,
        Err(RollbackRefused::AlreadyLive { release: 3 }),
    );
}

#[test]
fn refusals_read_as_text() {
    use RollbackRefused as No;
    #[rustfmt::skip]
    let cases = [
        (No::InProgress { release: 4 },
            "a rollout of release 4 is in progress; `kiln abort` it first, or roll back without --to to abort it"),
        (No::NoLiveRelease, "no live release to roll back from"),
        (No::NoPrevious { live: 1 }, "no release was live before release 1"),
        (No::AlreadyLive { release: 3 }, "release 3 is already live"),
        (No::RouteChanged { release: 2 },
            "release 2 has a different [route]; `kiln down` the app and apply it instead"),
        (No::Schema { release: 2, target_schema: 2, live_schema: 3, migrated_by: 3, compatible_from: 3 },
            "release 2 works with schema 2, but the live schema is 3 (migrated by release 3, \
             which works only with code for schema 3 or later); rolling back needs a backward \
             migration first, or --force to roll back anyway (recorded)"),
    ];
    for (refused, text) in cases {
        assert_eq!(refused.to_string(), text);
    }
}

#[test]
fn became_live_appends_once_and_keeps_the_last_32() {
    let long: Vec<u64> = (1..=32).collect();
    let cases: [(&[u64], u64, Vec<u64>); 5] = [
        (&[], 1, vec![1]),
        (&[1], 1, vec![1]),
        (&[1, 2], 1, vec![1, 2, 1]),
        (&long, 32, long.clone()),
        (&long, 33, (2..=33).collect()),
    ];
    for (before, release, want) in cases {
        let mut history = before.to_vec();
        became_live(&mut history, release);
        assert_eq!(history, want, "{before:?} + {release}");
    }
}

/// SplitMix64: a small deterministic generator, so every run checks the same sequences.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The controller as far as rollbacks go: its goal, state and history, changed the way
/// `apply`, the reconciler and `rollback` change them.
struct Controller {
    goal: Goal,
    state: RolloutState,
    history: Vec<u64>,
    next: u64,
}

/// What the test knows independently: which release is live, and which one was live just
/// before it.
#[derive(Debug, Default)]
struct Model {
    live: Option<u64>,
    before: Option<u64>,
    ever_live: BTreeSet<u64>,
}

impl Model {
    fn goes_live(&mut self, release: u64) {
        if self.live != Some(release) {
            self.before = self.live;
            self.live = Some(release);
        }
        self.ever_live.insert(release);
    }
}

impl Controller {
    fn live(&self) -> Option<u64> {
        match self.state.phase {
            Phase::Completed { .. } => Some(self.goal.release),
            _ => self.goal.stable,
        }
    }

    /// A rollout ends, one way or the other.
    fn settle(&mut self, rng: &mut Rng, model: &mut Model) {
        if self.state.phase != Phase::Progressing {
            return;
        }
        if rng.chance(70) {
            self.state.phase = Phase::Completed { at_ms: NOW };
            became_live(&mut self.history, self.goal.release);
            model.goes_live(self.goal.release);
        } else {
            self.state.phase = aborted();
        }
    }

    /// `kiln apply`: refused while a rollout is in progress; otherwise a new release, which
    /// completes, is aborted or is still rolling out when the next command comes.
    fn apply(&mut self, rng: &mut Rng, model: &mut Model) {
        if self.state.phase == Phase::Progressing {
            return;
        }
        self.goal = goal(self.next, self.live());
        self.next += 1;
        self.state = RolloutState::start(&self.goal, NOW);
        if rng.chance(70) {
            self.settle(rng, model);
        }
    }

    /// `kiln rollback`, without `--to` or (sometimes) to a release that was live.
    fn rollback(&mut self, rng: &mut Rng, model: &mut Model, trace: &str) {
        let to = if rng.chance(15) && !model.ever_live.is_empty() {
            let live: Vec<u64> = model.ever_live.iter().copied().collect();
            Some(live[rng.below(live.len() as u64) as usize])
        } else {
            None
        };
        let req = request(to, false);
        let got = rollback_target(&self.goal, &self.state, &self.history, &req);
        if self.state.phase == Phase::Progressing {
            if to.is_some() && to != self.goal.stable {
                assert_eq!(
                    got,
                    Err(RollbackRefused::InProgress {
                        release: self.goal.release
                    }),
                    "{trace}"
                );
                return;
            }
            let want = RollbackTarget::AbortRollout {
                from: self.goal.release,
                to: self.goal.stable.unwrap_or(self.goal.release),
            };
            assert_eq!(got, Ok(want), "{trace}");
            self.state.phase = aborted();
            return;
        }
        assert_eq!(self.live(), model.live, "{trace}");
        let Some(live) = model.live else {
            assert_eq!(got, Err(RollbackRefused::NoLiveRelease), "{trace}");
            return;
        };
        let want = match to.or(model.before) {
            None => Err(RollbackRefused::NoPrevious { live }),
            Some(to) if to == live => Err(RollbackRefused::AlreadyLive { release: to }),
            Some(to) => Ok(RollbackTarget::Release { from: live, to }),
        };
        assert_eq!(got, want, "{trace}");
        let Ok(RollbackTarget::Release { from, to }) = got else {
            return;
        };
        assert!(
            model.ever_live.contains(&to),
            "{trace}: {to} was never live"
        );
        assert_ne!(to, from, "{trace}");
        // Warm when `to` still has instances (keep_previous not over yet).
        let warm = rng.chance(60);
        let obs = Observed {
            instances: warm
                .then(|| inst("w", to, Condition::Healthy, None))
                .into_iter()
                .collect(),
            ..Observed::default()
        };
        let target = TargetRelease {
            number: to,
            deploy: deploy(None),
            same_route: true,
        };
        let p = plan_rollback(&self.goal, &target, from, &obs, None, &req, NOW)
            .unwrap_or_else(|e| panic!("{trace}: {e}"));
        assert_eq!(p.warm, warm, "{trace}");
        self.goal = p.goal;
        self.state = p.state;
        if warm {
            became_live(&mut self.history, to);
            model.goes_live(to);
        } else if rng.chance(50) {
            self.settle(rng, model);
        }
    }
}

#[test]
fn rollback_always_goes_to_the_release_live_just_before() {
    // The bug: in 50 rapid apply/rollback cycles, `kiln rollback` once went back to the
    // release it had just left instead of the one live before the apply. Random sequences
    // of applies (completed, aborted or still rolling out), settlements and rollbacks (warm
    // or cold, with and without --to) are checked against the test's own record of which
    // release was live before which.
    for seed in 0..200 {
        let mut rng = Rng(seed);
        let mut model = Model::default();
        // The first apply, rolling out.
        let mut c = Controller {
            goal: goal(1, None),
            state: RolloutState::start(&goal(1, None), NOW),
            history: Vec::new(),
            next: 2,
        };
        let mut trace = format!("seed {seed}:");
        for _ in 0..50 {
            match rng.below(10) {
                0..=3 => {
                    trace.push_str(" apply");
                    c.apply(&mut rng, &mut model);
                }
                4 => {
                    trace.push_str(" settle");
                    c.settle(&mut rng, &mut model);
                }
                _ => {
                    trace.push_str(" rollback");
                    c.rollback(&mut rng, &mut model, &trace);
                }
            }
        }
    }
}
