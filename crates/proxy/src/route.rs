//! Route tables: the caller's description of where an app's traffic goes ([`RouteTable`]), and
//! the published, immutable form that requests read (`Published`).
//!
//! Selection is deterministic so that a weight means exactly what it says: releases are picked
//! from a precomputed smooth weighted round-robin cycle indexed by one atomic counter (10% is
//! 1 pick in 10, spread evenly, with no lock), then the instance with the fewest outstanding
//! requests among the release's healthy ones. This module does no I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::RouteError;
use crate::instance::Backend;
use crate::stats::ReleaseStats;

/// The longest smooth weighted round-robin cycle precomputed for a table.
pub(crate) const MAX_CYCLE: u64 = 1 << 16;

/// Where an app's traffic goes: its releases, their weights and their instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    releases: Vec<RouteRelease>,
}

/// One release in a route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRelease {
    /// The release's name (`1` to `64` of `A-Z a-z 0-9 . _ -`), e.g. `r12`; it is carried in
    /// the sticky cookie, the preview header and metric labels.
    pub name: String,
    /// Its share of traffic relative to the other releases' weights; `0` takes no weighted
    /// traffic (but preview requests and nothing else).
    pub weight: u32,
    /// Its instances.
    pub instances: Vec<Instance>,
}

/// One instance of a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Whether it passed its health check; unhealthy instances get no new requests.
    pub healthy: bool,
}

impl Instance {
    /// A healthy instance at `addr`.
    #[must_use]
    pub fn healthy(addr: SocketAddr) -> Instance {
        Instance {
            addr,
            healthy: true,
        }
    }
}

impl RouteRelease {
    /// A release with healthy instances at `addrs`.
    #[must_use]
    pub fn new(name: impl Into<String>, weight: u32, addrs: &[SocketAddr]) -> RouteRelease {
        RouteRelease {
            name: name.into(),
            weight,
            instances: addrs.iter().copied().map(Instance::healthy).collect(),
        }
    }
}

impl RouteTable {
    /// Validates a table: release names are valid and distinct, no instance appears twice, and
    /// the weights' exact cycle is at most 65,536 picks long.
    pub fn new(releases: Vec<RouteRelease>) -> Result<RouteTable, RouteError> {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for (i, release) in releases.iter().enumerate() {
            if !valid_release_name(&release.name) {
                return Err(RouteError::InvalidReleaseName {
                    name: release.name.clone(),
                });
            }
            if releases[..i].iter().any(|r| r.name == release.name) {
                return Err(RouteError::DuplicateRelease {
                    name: release.name.clone(),
                });
            }
            for instance in &release.instances {
                if addrs.contains(&instance.addr) {
                    return Err(RouteError::DuplicateInstance {
                        addr: instance.addr,
                    });
                }
                addrs.push(instance.addr);
            }
        }
        let weights: Vec<u32> = releases.iter().map(|r| r.weight).collect();
        schedule(&weights)?;
        Ok(RouteTable { releases })
    }

    /// An empty table: every request gets 503.
    #[must_use]
    pub fn empty() -> RouteTable {
        RouteTable {
            releases: Vec::new(),
        }
    }

    /// The releases, in the order given.
    #[must_use]
    pub fn releases(&self) -> &[RouteRelease] {
        &self.releases
    }
}

fn valid_release_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The smooth weighted round-robin cycle for `weights` (as used by nginx): each pick adds every
/// weight to its release's credit and takes the release with the most credit, which then pays
/// the total. Over one cycle each release is picked exactly `weight / gcd` times, spread evenly.
/// Releases with weight 0 never appear; all-zero weights give an empty cycle.
pub(crate) fn schedule(weights: &[u32]) -> Result<Vec<u16>, RouteError> {
    let common = weights.iter().map(|&w| u64::from(w)).fold(0, gcd).max(1);
    let reduced: Vec<i64> = weights
        .iter()
        .map(|&w| i64::from(w) / i64::try_from(common).unwrap_or(1))
        .collect();
    let total: i64 = reduced.iter().sum();
    let period = u64::try_from(total).unwrap_or(u64::MAX);
    if period > MAX_CYCLE || weights.len() > usize::from(u16::MAX) {
        return Err(RouteError::WeightsTooFine {
            weights: weights.to_vec(),
            period,
            max: MAX_CYCLE,
        });
    }
    let mut credit = vec![0_i64; reduced.len()];
    let mut cycle = Vec::with_capacity(usize::try_from(period).unwrap_or(0));
    for _ in 0..period {
        let mut best = 0;
        for (i, w) in reduced.iter().enumerate() {
            credit[i] += w;
            if credit[i] > credit[best] {
                best = i;
            }
        }
        credit[best] -= total;
        // The length check above keeps every index within u16.
        cycle.push(u16::try_from(best).unwrap_or(0));
    }
    Ok(cycle)
}

/// A route table as requests see it: immutable except for its selection counters, and
/// published whole by an atomic pointer swap.
pub(crate) struct Published {
    pub(crate) releases: Vec<LiveRelease>,
    cycle: Vec<u16>,
    next: AtomicUsize,
}

/// A release in a published table.
pub(crate) struct LiveRelease {
    pub(crate) name: Arc<str>,
    pub(crate) weight: u32,
    /// Only the healthy instances: unhealthy ones are not candidates.
    pub(crate) healthy: Vec<Arc<Backend>>,
    pub(crate) stats: Arc<ReleaseStats>,
    /// Where the least-outstanding scan starts, so that ties are spread across instances.
    rotation: AtomicUsize,
}

impl LiveRelease {
    pub(crate) fn new(
        name: Arc<str>,
        weight: u32,
        healthy: Vec<Arc<Backend>>,
        stats: Arc<ReleaseStats>,
    ) -> LiveRelease {
        LiveRelease {
            name,
            weight,
            healthy,
            stats,
            rotation: AtomicUsize::new(0),
        }
    }

    /// The healthy instance with the fewest outstanding requests, skipping `tried`.
    pub(crate) fn least_outstanding(&self, tried: &[SocketAddr]) -> Option<&Arc<Backend>> {
        let n = self.healthy.len();
        if n == 0 {
            return None;
        }
        // A lone instance needs no tie-break; skipping the shared counter keeps its cache line
        // from moving between the router's threads on every request.
        let start = if n == 1 {
            0
        } else {
            self.rotation.fetch_add(1, Ordering::Relaxed) % n
        };
        let mut best: Option<(&Arc<Backend>, usize)> = None;
        for k in 0..n {
            let instance = &self.healthy[(start + k) % n];
            if tried.contains(&instance.addr) {
                continue;
            }
            let load = instance.outstanding();
            if best.is_none_or(|(_, b)| load < b) {
                best = Some((instance, load));
            }
        }
        best.map(|(instance, _)| instance)
    }
}

impl Published {
    /// Publishes releases whose weights were validated by [`RouteTable::new`].
    pub(crate) fn new(releases: Vec<LiveRelease>) -> Published {
        let weights: Vec<u32> = releases.iter().map(|r| r.weight).collect();
        Published {
            cycle: schedule(&weights).unwrap_or_default(),
            releases,
            next: AtomicUsize::new(0),
        }
    }

    /// The next release by weight, or `None` when no release has weight.
    pub(crate) fn pick_weighted(&self) -> Option<usize> {
        match self.cycle.as_slice() {
            [] => return None,
            // One release takes all weighted traffic (the steady state, and either side of a
            // blue-green switch): no need to advance the shared counter.
            [only] => return Some(usize::from(*only)),
            _ => {}
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.cycle
            .get(n % self.cycle.len())
            .map(|&i| usize::from(i))
    }

    /// The release named `name`, whatever its weight (preview).
    pub(crate) fn by_name(&self, name: &str) -> Option<usize> {
        self.releases.iter().position(|r| &*r.name == name)
    }

    /// The release named by a sticky cookie, if it still takes weighted traffic: a client on an
    /// aborted canary moves on.
    pub(crate) fn sticky(&self, name: &str) -> Option<usize> {
        self.by_name(name)
            .filter(|&i| self.releases.get(i).is_some_and(|r| r.weight > 0))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn counts(weights: &[u32], picks: usize) -> Vec<usize> {
        let cycle = schedule(weights).unwrap();
        let mut counts = vec![0; weights.len()];
        for n in 0..picks {
            counts[usize::from(cycle[n % cycle.len()])] += 1;
        }
        counts
    }

    #[test]
    fn weights_are_exact_over_whole_cycles() {
        for (weights, picks, want) in [
            (&[10, 90][..], 10_000, &[1_000, 9_000][..]),
            (&[1, 1, 1][..], 300, &[100, 100, 100][..]),
            (&[0, 5][..], 10, &[0, 10][..]),
            (&[3, 0, 7][..], 1_000, &[300, 0, 700][..]),
            (&[100][..], 7, &[7][..]),
        ] {
            assert_eq!(counts(weights, picks), want, "weights {weights:?}");
        }
    }

    #[test]
    fn picks_are_spread_not_bunched() {
        // 10/90 must not send ten canary requests in a row: the canary appears once in every
        // block of ten.
        let cycle = schedule(&[10, 90]).unwrap();
        assert_eq!(cycle.len(), 10);
        assert_eq!(cycle.iter().filter(|&&i| i == 0).count(), 1);
        let cycle = schedule(&[1, 2]).unwrap();
        assert_eq!(cycle, [1, 0, 1]);
    }

    #[test]
    fn zero_weights_give_an_empty_cycle() {
        assert!(schedule(&[0, 0]).unwrap().is_empty());
        assert!(schedule(&[]).unwrap().is_empty());
    }

    #[test]
    fn too_fine_weights_are_refused() {
        let err = schedule(&[1, 70_000]).unwrap_err();
        assert!(matches!(
            err,
            RouteError::WeightsTooFine { period: 70_001, .. }
        ));
        // A common factor is divided out first.
        assert_eq!(schedule(&[100_000, 300_000]).unwrap().len(), 4);
    }

    #[test]
    fn route_tables_validate_names_and_instances() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert!(
            RouteTable::new(vec![
                RouteRelease::new("r1", 1, &[a]),
                RouteRelease::new("r2", 1, &[b])
            ])
            .is_ok()
        );
        for (table, want) in [
            (
                vec![
                    RouteRelease::new("r1", 1, &[a]),
                    RouteRelease::new("r1", 1, &[b]),
                ],
                "release \"r1\" appears twice in the route table",
            ),
            (
                vec![
                    RouteRelease::new("r1", 1, &[a]),
                    RouteRelease::new("r2", 1, &[a]),
                ],
                "instance 127.0.0.1:1 appears twice in the route table",
            ),
            (
                vec![RouteRelease::new("r 1", 1, &[a])],
                "release name \"r 1\" is not valid: use 1 to 64 characters from A-Z a-z 0-9 . _ -",
            ),
            (
                vec![RouteRelease::new("", 1, &[a])],
                "release name \"\" is not valid: use 1 to 64 characters from A-Z a-z 0-9 . _ -",
            ),
        ] {
            assert_eq!(RouteTable::new(table).unwrap_err().to_string(), want);
        }
    }
}
