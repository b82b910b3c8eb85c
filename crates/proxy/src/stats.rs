//! Per-release measurements: cumulative counters and a duration histogram for Prometheus, and
//! a sliding window of one-second buckets (HDR histograms) that canary analysis reads through
//! [`crate::App::snapshot`].
//!
//! The window is a pure structure driven by a second counter passed in, so it is tested
//! without clocks. Latency is measured from the request's arrival to the upstream's response
//! head (time to first byte): a stream's length says nothing about the release's health.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::app::App;

/// The longest window [`crate::App::snapshot`] can look back over, in seconds.
pub const WINDOW_MAX_SECONDS: u64 = 60;

/// The largest latency the window histograms hold exactly (longer ones are clamped), in µs.
const HIST_MAX_MICROS: u64 = 60_000_000;

/// Upper bounds of the Prometheus duration histogram buckets, in seconds.
const DURATION_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What went wrong talking to an upstream, for `kiln_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    /// The connection could not be made; the request was tried elsewhere.
    Connect,
    /// The connection broke before a response head arrived.
    Reset,
    /// No response head within the request timeout.
    Timeout,
}

impl UpstreamError {
    const ALL: [UpstreamError; 3] = [
        UpstreamError::Connect,
        UpstreamError::Reset,
        UpstreamError::Timeout,
    ];

    fn label(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Reset => "reset",
            UpstreamError::Timeout => "timeout",
        }
    }
}

/// A release's measurements over a recent window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Responses sent (including the router's own 5xx for upstream failures).
    pub requests: u64,
    /// Responses with a 5xx status.
    pub errors: u64,
    /// `errors / requests`, or 0 when there were no requests.
    pub error_rate: f64,
    /// Median time to the response head.
    pub p50: Duration,
    /// 99th percentile time to the response head.
    pub p99: Duration,
}

/// One second of measurements.
struct Bucket {
    second: u64,
    requests: u64,
    errors: u64,
    latency: Histogram<u32>,
}

/// A ring of one-second buckets covering the last [`WINDOW_MAX_SECONDS`] seconds.
pub(crate) struct Window {
    buckets: Vec<Bucket>,
}

fn histogram() -> Option<Histogram<u32>> {
    // Two significant figures: 1% precision is plenty to compare releases, at a tenth of the
    // memory of three.
    Histogram::new_with_bounds(1, HIST_MAX_MICROS, 2).ok()
}

impl Window {
    pub(crate) fn new() -> Option<Window> {
        let mut buckets = Vec::new();
        for _ in 0..WINDOW_MAX_SECONDS {
            buckets.push(Bucket {
                second: u64::MAX,
                requests: 0,
                errors: 0,
                latency: histogram()?,
            });
        }
        Some(Window { buckets })
    }

    /// Records one response at second `now`.
    pub(crate) fn record(&mut self, now: u64, latency: Duration, error: bool) {
        let len = self.buckets.len() as u64;
        let Some(bucket) = usize::try_from(now % len)
            .ok()
            .and_then(|i| self.buckets.get_mut(i))
        else {
            return;
        };
        if bucket.second != now {
            bucket.second = now;
            bucket.requests = 0;
            bucket.errors = 0;
            bucket.latency.reset();
        }
        bucket.requests += 1;
        bucket.errors += u64::from(error);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        bucket
            .latency
            .saturating_record(micros.clamp(1, HIST_MAX_MICROS));
    }

    /// The measurements of seconds `now - seconds + 1 ..= now` (at most the ring's length).
    pub(crate) fn snapshot(&self, now: u64, seconds: u64) -> Snapshot {
        let seconds = seconds.clamp(1, self.buckets.len() as u64);
        let oldest = now.saturating_sub(seconds - 1);
        let (mut requests, mut errors) = (0, 0);
        let mut merged = histogram();
        for bucket in &self.buckets {
            if bucket.second < oldest || bucket.second > now {
                continue;
            }
            requests += bucket.requests;
            errors += bucket.errors;
            if let Some(m) = merged.as_mut() {
                // Same bounds on both sides, so adding cannot fail.
                let _ = m.add(&bucket.latency);
            }
        }
        let quantile = |q: f64| {
            merged
                .as_ref()
                .filter(|m| !m.is_empty())
                .map_or(Duration::ZERO, |m| {
                    Duration::from_micros(m.value_at_quantile(q))
                })
        };
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let error_rate = if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        };
        Snapshot {
            requests,
            errors,
            error_rate,
            p50: quantile(0.5),
            p99: quantile(0.99),
        }
    }
}

/// Everything measured for one release of one app. Shared by every table that lists the
/// release, so its counters survive route changes.
pub(crate) struct ReleaseStats {
    pub(crate) release: Arc<str>,
    /// Responses by status class, 1xx to 5xx.
    by_class: [AtomicU64; 5],
    upstream_errors: [AtomicU64; 3],
    /// Responses per duration bucket (not cumulative); slower than the last bound: none.
    duration_buckets: [AtomicU64; DURATION_BOUNDS.len()],
    duration_sum_micros: AtomicU64,
    window: Option<Mutex<Window>>,
    /// Set by [`ReleaseStats::watch_first_response`]; the next response clears it and leaves
    /// its time in `first_response`. Requests only load the flag (relaxed) while unset.
    watching: AtomicBool,
    first_response: Mutex<Option<Instant>>,
}

impl ReleaseStats {
    pub(crate) fn new(release: Arc<str>) -> ReleaseStats {
        ReleaseStats {
            release,
            by_class: Default::default(),
            upstream_errors: Default::default(),
            duration_buckets: Default::default(),
            duration_sum_micros: AtomicU64::new(0),
            window: Window::new().map(Mutex::new),
            watching: AtomicBool::new(false),
            first_response: Mutex::new(None),
        }
    }

    /// Records a response sent to a client.
    pub(crate) fn record(&self, now: u64, status: u16, latency: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(counter) = self.by_class.get(class) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        // One increment per response: the buckets hold per-bucket counts, summed into
        // Prometheus' cumulative form only when rendered.
        let seconds = latency.as_secs_f64();
        if let Some(counter) = DURATION_BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .and_then(|i| self.duration_buckets.get(i))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.duration_sum_micros
            .fetch_add(micros, Ordering::Relaxed);
        if let Some(window) = &self.window {
            window
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .record(now, latency, status >= 500);
        }
    }

    /// Forgets the last watched response and catches the time of the next one.
    pub(crate) fn watch_first_response(&self) {
        *self
            .first_response
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.watching.store(true, Ordering::SeqCst);
    }

    /// When the first response after the last [`ReleaseStats::watch_first_response`] arrived.
    pub(crate) fn first_response(&self) -> Option<Instant> {
        *self
            .first_response
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a response head that arrived at `at`, for a watch in progress.
    pub(crate) fn saw_response(&self, at: Instant) {
        if self.watching.load(Ordering::Relaxed) && self.watching.swap(false, Ordering::AcqRel) {
            *self
                .first_response
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(at);
        }
    }

    pub(crate) fn upstream_error(&self, kind: UpstreamError) {
        let i = UpstreamError::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        if let Some(counter) = self.upstream_errors.get(i) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self, now: u64, seconds: u64) -> Snapshot {
        match &self.window {
            Some(w) => w
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .snapshot(now, seconds),
            None => Window::empty_snapshot(),
        }
    }
}

impl Window {
    fn empty_snapshot() -> Snapshot {
        Snapshot {
            requests: 0,
            errors: 0,
            error_rate: 0.0,
            p50: Duration::ZERO,
            p99: Duration::ZERO,
        }
    }
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes every app's metrics in the Prometheus text exposition format (version 0.0.4).
#[must_use]
pub fn render_prometheus(apps: &[Arc<App>]) -> String {
    let mut out = String::new();
    let releases: Vec<(String, Arc<ReleaseStats>)> = apps
        .iter()
        .flat_map(|app| {
            let name = label(app.name());
            app.all_stats().into_iter().map(move |s| (name.clone(), s))
        })
        .collect();

    let _ = writeln!(
        out,
        "# HELP kiln_requests_total Responses sent to clients, by release and status class.\n# TYPE kiln_requests_total counter"
    );
    for (app, stats) in &releases {
        let release = label(&stats.release);
        for (i, counter) in stats.by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "kiln_requests_total{{app=\"{app}\",release=\"{release}\",code_class=\"{}xx\"}} {}",
                i + 1,
                counter.load(Ordering::Relaxed)
            );
        }
    }

    let _ = writeln!(
        out,
        "# HELP kiln_request_duration_seconds Time from a request's arrival to its response head.\n# TYPE kiln_request_duration_seconds histogram"
    );
    for (app, stats) in &releases {
        let release = label(&stats.release);
        let mut count = 0;
        let mut cumulative = 0;
        for (bound, counter) in DURATION_BOUNDS.iter().zip(&stats.duration_buckets) {
            cumulative += counter.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "kiln_request_duration_seconds_bucket{{app=\"{app}\",release=\"{release}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        for counter in &stats.by_class {
            count += counter.load(Ordering::Relaxed);
        }
        #[allow(clippy::cast_precision_loss)] // a sum of microseconds far below 2^52 µs
        let sum = stats.duration_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "kiln_request_duration_seconds_bucket{{app=\"{app}\",release=\"{release}\",le=\"+Inf\"}} {count}\nkiln_request_duration_seconds_sum{{app=\"{app}\",release=\"{release}\"}} {sum}\nkiln_request_duration_seconds_count{{app=\"{app}\",release=\"{release}\"}} {count}"
        );
    }

    let _ = writeln!(
        out,
        "# HELP kiln_upstream_errors_total Failed attempts to reach an instance, by kind (retried attempts included).\n# TYPE kiln_upstream_errors_total counter"
    );
    for (app, stats) in &releases {
        let release = label(&stats.release);
        for (kind, counter) in UpstreamError::ALL.iter().zip(&stats.upstream_errors) {
            let _ = writeln!(
                out,
                "kiln_upstream_errors_total{{app=\"{app}\",release=\"{release}\",kind=\"{}\"}} {}",
                kind.label(),
                counter.load(Ordering::Relaxed)
            );
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_window_counts_only_its_seconds() {
        let mut w = Window::new().unwrap();
        w.record(10, ms(5), false);
        w.record(11, ms(5), true);
        w.record(12, ms(5), false);
        w.record(12, ms(5), true);
        for (now, seconds, requests, errors) in [
            (12, 1, 2, 1),
            (12, 2, 3, 2),
            (12, 3, 4, 2),
            (12, 60, 4, 2),
            (13, 1, 0, 0),
            (13, 2, 2, 1),
            // Far in the future, everything has slid out.
            (200, 60, 0, 0),
        ] {
            let s = w.snapshot(now, seconds);
            assert_eq!(
                (s.requests, s.errors),
                (requests, errors),
                "now {now} last {seconds}s"
            );
        }
        assert!((w.snapshot(12, 2).error_rate - 2.0 / 3.0).abs() < 1e-9);
        assert!(w.snapshot(13, 1).error_rate.abs() < f64::EPSILON);
    }

    #[test]
    fn a_bucket_reused_after_a_lap_starts_empty() {
        let mut w = Window::new().unwrap();
        w.record(5, ms(5), true);
        // Second 65 lands in the same slot as second 5.
        w.record(65, ms(5), false);
        let s = w.snapshot(65, 60);
        assert_eq!((s.requests, s.errors), (1, 0));
    }

    #[test]
    fn percentiles_come_from_the_window() {
        let mut w = Window::new().unwrap();
        for i in 1..=100 {
            w.record(1, ms(i), false);
        }
        w.record(2, ms(1_000), false);
        let s = w.snapshot(1, 1);
        // Two significant figures: within 1%.
        assert!((49..=51).contains(&s.p50.as_millis()), "p50 {:?}", s.p50);
        assert!((98..=101).contains(&s.p99.as_millis()), "p99 {:?}", s.p99);
        let s = w.snapshot(2, 1);
        assert!(
            (990..=1_010).contains(&s.p99.as_millis()),
            "p99 {:?}",
            s.p99
        );
        assert_eq!(w.snapshot(3, 1).p99, Duration::ZERO);
    }

    #[test]
    fn release_stats_feed_every_metric() {
        let s = ReleaseStats::new("r1".into());
        s.record(1, 200, ms(2));
        s.record(1, 503, ms(20));
        s.upstream_error(UpstreamError::Connect);
        s.upstream_error(UpstreamError::Timeout);
        assert_eq!(s.by_class[1].load(Ordering::Relaxed), 1);
        assert_eq!(s.by_class[4].load(Ordering::Relaxed), 1);
        assert_eq!(s.upstream_errors[0].load(Ordering::Relaxed), 1);
        assert_eq!(s.upstream_errors[2].load(Ordering::Relaxed), 1);
        // The 2 ms response falls in (0.001, 0.0025], the 20 ms one in (0.01, 0.025].
        assert_eq!(s.duration_buckets[2].load(Ordering::Relaxed), 1);
        assert_eq!(s.duration_buckets[5].load(Ordering::Relaxed), 1);
        assert_eq!(s.duration_sum_micros.load(Ordering::Relaxed), 22_000);
        let snap = s.snapshot(1, 1);
        assert_eq!((snap.requests, snap.errors), (2, 1));
    }

    #[test]
    fn a_watch_catches_only_the_first_response_after_it() {
        let s = ReleaseStats::new("r1".into());
        let t0 = Instant::now();
        s.saw_response(t0);
        assert_eq!(s.first_response(), None, "no watch yet");
        s.watch_first_response();
        let t1 = t0 + ms(1);
        s.saw_response(t1);
        s.saw_response(t1 + ms(1));
        assert_eq!(s.first_response(), Some(t1));
        s.watch_first_response();
        assert_eq!(s.first_response(), None);
    }

    #[test]
    fn the_rendered_histogram_is_cumulative() {
        let app = App::new(crate::AppConfig::new("shop"));
        app.set_route(
            &crate::RouteTable::new(vec![crate::RouteRelease::new("r1", 1, &[])]).unwrap(),
        );
        let stats = app.all_stats().pop().unwrap();
        stats.record(0, 200, ms(2));
        stats.record(0, 200, ms(20));
        stats.record(0, 200, Duration::from_secs(30));
        let text = render_prometheus(&[app]);
        for want in [
            "kiln_request_duration_seconds_bucket{app=\"shop\",release=\"r1\",le=\"0.001\"} 0\n",
            "kiln_request_duration_seconds_bucket{app=\"shop\",release=\"r1\",le=\"0.0025\"} 1\n",
            "kiln_request_duration_seconds_bucket{app=\"shop\",release=\"r1\",le=\"0.025\"} 2\n",
            "kiln_request_duration_seconds_bucket{app=\"shop\",release=\"r1\",le=\"10\"} 2\n",
            "kiln_request_duration_seconds_bucket{app=\"shop\",release=\"r1\",le=\"+Inf\"} 3\n",
            "kiln_request_duration_seconds_count{app=\"shop\",release=\"r1\"} 3\n",
            "kiln_request_duration_seconds_sum{app=\"shop\",release=\"r1\"} 30.022\n",
            "kiln_requests_total{app=\"shop\",release=\"r1\",code_class=\"2xx\"} 3\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
