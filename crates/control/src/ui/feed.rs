//! The dashboard's live state: once a second, every app's status and, for each release it
//! routes to, what the router measured over the last [`WINDOW`] (request rate, error rate,
//! p99), kept for [`KEEP`] so a chart opened mid-rollout has its history; every
//! [`VERIFY_EVERY`], the ledger's verification. One sampler serves every watching dashboard:
//! a feed costs a clone of the latest state per second, not a status call.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::app::release_name;
use crate::controller::Controller;

/// How often the state is taken.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The router's window each point measures: long enough that the second in progress does
/// not make the rate jump.
pub(crate) const WINDOW: Duration = Duration::from_secs(5);

/// How many points a release's series keeps: five minutes.
const KEEP: usize = 300;

/// How often (in seconds) the ledger's chain is verified for the dashboard: when its head
/// moved, at most every [`VERIFY_MOVED`]; else every [`VERIFY_EVERY`]. A walk of the whole
/// chain, on a blocking thread.
const VERIFY_MOVED: u32 = 10;
const VERIFY_EVERY: u32 = 60;

/// With no page watching, one sample in this many seconds.
const IDLE_EVERY: u32 = 10;

/// One measurement of one release.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    at_ms: i64,
    requests: u64,
    rps: f64,
    error_rate: f64,
    p99_ms: f64,
}

impl Point {
    fn json(&self) -> Value {
        json!([
            self.at_ms,
            round(self.rps),
            round(self.error_rate * 100.0),
            round(self.p99_ms)
        ])
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The dashboard's state, and each app's releases' recent measurements.
pub struct Feed {
    latest: watch::Sender<Bytes>,
    series: Mutex<BTreeMap<String, BTreeMap<u64, VecDeque<Point>>>>,
}

impl Feed {
    /// A feed and its sampler, which runs until aborted.
    pub fn start(c: Arc<Controller>) -> (Arc<Feed>, tokio::task::JoinHandle<()>) {
        let (latest, _) = watch::channel(Bytes::from_static(b"{\"apps\":[],\"starting\":true}"));
        let feed = Arc::new(Feed {
            latest,
            series: Mutex::default(),
        });
        let sampler = tokio::spawn(sample(Arc::clone(&feed), c));
        (feed, sampler)
    }

    /// The latest state, as JSON.
    pub fn latest(&self) -> Bytes {
        self.latest.borrow().clone()
    }

    /// Each new state as it is taken.
    pub fn subscribe(&self) -> watch::Receiver<Bytes> {
        self.latest.subscribe()
    }

    /// `app`'s series: `{"window_s": 5, "releases": {"N": [[at_ms, rps, error %, p99 ms], …]}}`.
    pub fn series(&self, app: &str) -> Value {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let releases: serde_json::Map<String, Value> = series
            .get(app)
            .into_iter()
            .flatten()
            .map(|(r, points)| (r.to_string(), points.iter().map(Point::json).collect()))
            .collect();
        json!({"window_s": WINDOW.as_secs(), "releases": releases})
    }

    /// Adds `point` to `app`'s `release` and forgets what no app or release has any more.
    fn record(&self, app: &str, release: u64, point: Point) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let points = series
            .entry(app.to_owned())
            .or_default()
            .entry(release)
            .or_default();
        if points.len() == KEEP {
            points.pop_front();
        }
        points.push_back(point);
    }

    fn forget(&self, apps: &BTreeSet<String>, now_ms: i64) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.retain(|app, _| apps.contains(app));
        for releases in series.values_mut() {
            let horizon = now_ms - i64::try_from(KEEP).unwrap_or(0) * 1000;
            releases.retain(|_, points| points.back().is_some_and(|p| p.at_ms > horizon));
        }
    }
}

/// The sampler: takes the state every [`SAMPLE_EVERY`] while a page watches the feed, every
/// [`IDLE_EVERY`] samples otherwise (so a page opening finds a recent state and history).
async fn sample(feed: Arc<Feed>, c: Arc<Controller>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut chain = Value::Null;
    let mut verified: Option<(u64, u32)> = None;
    let mut ticks = 0u32;
    let mut idle = 0u32;
    loop {
        every.tick().await;
        ticks = ticks.wrapping_add(1);
        if feed.latest.receiver_count() == 0 && idle > 0 && idle < IDLE_EVERY {
            idle += 1;
            continue;
        }
        idle = 1;
        let head = c.exec.ledger().head().map_or(0, |(seq, _)| seq);
        let due = match verified {
            None => true,
            Some((at, when)) => {
                let since = ticks.wrapping_sub(when);
                (at != head && since >= VERIFY_MOVED) || since >= VERIFY_EVERY
            }
        };
        if due {
            let ledger = Arc::clone(&c);
            chain = tokio::task::spawn_blocking(move || verify(&ledger))
                .await
                .unwrap_or(Value::Null);
            verified = Some((head, ticks));
        }
        let state = take(&feed, &c, &chain, head).await;
        feed.latest
            .send_replace(Bytes::from(serde_json::to_vec(&state).unwrap_or_default()));
    }
}

async fn take(feed: &Feed, c: &Controller, chain: &Value, head: u64) -> Value {
    let now = c.exec.clock.now_ms();
    let names = c.app_names().await;
    let mut apps = Vec::with_capacity(names.len());
    let mut points = serde_json::Map::new();
    for name in &names {
        let status = match c.status(name).await {
            Ok(s) => s,
            Err(e) => {
                apps.push(json!({"app": name, "phase": "unknown", "error": e.to_string()}));
                continue;
            }
        };
        let mut measured = serde_json::Map::new();
        let releases: BTreeSet<u64> = status
            .weights
            .keys()
            .copied()
            .chain([status.release])
            .chain(status.stable)
            .collect();
        for r in releases {
            let snapshot = match c.exec.plane.snapshot(name, &release_name(r), WINDOW).await {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(app = %name, release = r, error = %e, "no measurements for the dashboard");
                    continue;
                }
            };
            #[allow(clippy::cast_precision_loss)] // counts far below 2^52
            let point = Point {
                at_ms: now,
                requests: snapshot.requests,
                rps: snapshot.requests as f64 / WINDOW.as_secs_f64(),
                error_rate: snapshot.error_rate,
                p99_ms: snapshot.p99.as_secs_f64() * 1000.0,
            };
            feed.record(name, r, point);
            measured.insert(r.to_string(), point.json());
        }
        points.insert(name.clone(), Value::Object(measured));
        apps.push(brief(&status));
    }
    feed.forget(&names.iter().cloned().collect(), now);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "at_ms": now,
        "head": head,
        "window_s": WINDOW.as_secs(),
        "apps": apps,
        "points": points,
        "chain": chain,
    })
}

/// An app's status as the dashboard shows it: all of it but the release's configuration,
/// of which it keeps `[deploy]` (the steps and the analysis' thresholds), and its source's
/// last build or test output, which anyone reaching the dashboard would read.
fn brief(status: &crate::dto::AppStatus) -> Value {
    let mut v = serde_json::to_value(status).unwrap_or(Value::Null);
    if let Some(last) = v
        .get_mut("source")
        .and_then(|s| s.get_mut("last"))
        .and_then(Value::as_object_mut)
    {
        last.remove("output");
    }
    if let Some(o) = v.as_object_mut() {
        let deploy = o
            .get("config")
            .and_then(|c| c.get("deploy"))
            .cloned()
            .unwrap_or(Value::Null);
        o.remove("config");
        o.insert("deploy".to_owned(), deploy);
    }
    v
}

/// The ledger's verification, in short: ok or what broke where.
fn verify(c: &Controller) -> Value {
    let result = c.verify();
    match result {
        Ok(Ok(r)) => json!({
            "state": "ok",
            "events": r.events,
            "releases": r.releases,
            "head": r.head,
            "checkpoints": r.anchor.as_ref().map(|a| a.checked),
        }),
        Ok(Err(e)) => json!({"state": "broken", "seq": e.seq, "message": e.to_string()}),
        Err(e) => json!({"state": "unknown", "message": e.to_string()}),
    }
}

/// One server-sent event.
pub(crate) fn sse_event(name: &str, data: &Bytes) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + name.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // JSON from serde_json has no raw newlines; a line break would end the event's data.
    out.extend(data.iter().copied().filter(|b| *b != b'\n' && *b != b'\r'));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn point(at_ms: i64) -> Point {
        Point {
            at_ms,
            requests: 10,
            rps: 2.0,
            error_rate: 0.1,
            p99_ms: 12.345,
        }
    }

    fn feed() -> Feed {
        let (latest, _) = watch::channel(Bytes::new());
        Feed {
            latest,
            series: Mutex::default(),
        }
    }

    #[test]
    fn a_series_keeps_the_last_points_and_forgets_gone_apps_and_releases() {
        let f = feed();
        for i in 0..(KEEP as i64 + 10) {
            f.record("web", 2, point(i * 1000));
        }
        f.record("web", 1, point(0));
        f.record("old", 1, point(0));
        let s = f.series("web");
        assert_eq!(s["releases"]["2"].as_array().unwrap().len(), KEEP);
        assert_eq!(s["releases"]["2"][0], json!([10_000, 2.0, 10.0, 12.35]));
        let now = (KEEP as i64 + 10) * 1000;
        f.forget(&["web".to_owned()].into(), now);
        let s = f.series("web");
        assert!(s["releases"].get("1").is_none(), "{s}");
        assert!(s["releases"].get("2").is_some(), "{s}");
        assert_eq!(f.series("old")["releases"], json!({}));
    }

    #[test]
    fn an_event_is_one_data_line() {
        let e = sse_event("state", &Bytes::from_static(b"{\"a\":\n1}"));
        assert_eq!(&e[..], b"event: state\ndata: {\"a\":1}\n\n");
    }
}
