//! Canary analysis: the verdict on one step, from the router's measurements of the canary and
//! the stable release over the step's window.
//!
//! The rules, all from `[deploy.analysis]`:
//!
//! - fewer than `min_requests` canary requests is **inconclusive**;
//! - the canary's error rate above `max_error_rate` **fails**;
//! - its p99 above `max_p99` **fails**;
//! - with `compare_to_stable`, and when stable saw at least `min_requests` too, the canary
//!   **fails** when its error rate exceeds stable's by more than half of `max_error_rate`, or
//!   its p99 exceeds stable's by more than [`P99_TOLERANCE_RATIO`] plus
//!   [`P99_TOLERANCE_MS`] (so ordinary noise between two healthy releases passes).

use std::fmt;
use std::time::Duration;

use kiln_spec::Analysis;

/// A canary p99 may exceed stable's by this factor (plus [`P99_TOLERANCE_MS`]).
pub const P99_TOLERANCE_RATIO: f64 = 1.5;
/// …and by this many milliseconds on top, so a few ms of jitter on fast endpoints pass.
pub const P99_TOLERANCE_MS: f64 = 50.0;

/// What the router measured for one release over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Requests that completed.
    pub requests: u64,
    /// Of those, failures: 5xx responses and upstream errors.
    pub errors: u64,
    /// 99th percentile latency in milliseconds (0 when there were no requests).
    pub p99_ms: f64,
}

impl Measurement {
    /// Errors over requests (0 when there were none).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// The measurements a step is judged on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMetrics {
    /// The canary release.
    pub canary: Measurement,
    /// The stable release, over the same window.
    pub stable: Measurement,
}

/// The outcome of judging one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every check passed.
    Pass {
        /// The numbers it was judged on.
        metrics: StepMetrics,
    },
    /// Too few requests to judge.
    Inconclusive {
        /// The numbers so far.
        metrics: StepMetrics,
    },
    /// A check failed; `reason` says which, with the numbers.
    Fail {
        /// The numbers it was judged on.
        metrics: StepMetrics,
        /// e.g. `error rate 19.8% over 412 requests > 1.0%`.
        reason: String,
    },
}

fn pct(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

fn ms(d: f64) -> String {
    format!("{d:.0}ms")
}

/// Judges one step.
pub fn judge(a: &Analysis, m: StepMetrics) -> Verdict {
    let c = m.canary;
    let s = m.stable;
    if c.requests < a.min_requests {
        return Verdict::Inconclusive { metrics: m };
    }
    let fail = |reason: String| Verdict::Fail { metrics: m, reason };
    let rate = c.error_rate();
    if rate > a.max_error_rate {
        return fail(format!(
            "error rate {} over {} requests > {}",
            pct(rate),
            c.requests,
            pct(a.max_error_rate)
        ));
    }
    if let Some(max) = a.max_p99 {
        let max_ms = duration_ms(max);
        if c.p99_ms > max_ms {
            return fail(format!(
                "p99 {} over {} requests > {}",
                ms(c.p99_ms),
                c.requests,
                ms(max_ms)
            ));
        }
    }
    if a.compare_to_stable && s.requests >= a.min_requests {
        let margin = a.max_error_rate / 2.0;
        if rate > s.error_rate() + margin {
            return fail(format!(
                "error rate {} over {} requests > stable's {} + {}",
                pct(rate),
                c.requests,
                pct(s.error_rate()),
                pct(margin)
            ));
        }
        let bound = s.p99_ms * P99_TOLERANCE_RATIO + P99_TOLERANCE_MS;
        if c.p99_ms > bound {
            return fail(format!(
                "p99 {} over {} requests > stable's {} (tolerance {})",
                ms(c.p99_ms),
                c.requests,
                ms(s.p99_ms),
                ms(bound)
            ));
        }
    }
    Verdict::Pass { metrics: m }
}

fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Pass { metrics } => write!(
                f,
                "passed: error rate {} over {} requests, p99 {}",
                pct(metrics.canary.error_rate()),
                metrics.canary.requests,
                ms(metrics.canary.p99_ms)
            ),
            Verdict::Inconclusive { metrics } => write!(
                f,
                "inconclusive: {} requests so far",
                metrics.canary.requests
            ),
            Verdict::Fail { reason, .. } => f.write_str(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analysis() -> Analysis {
        Analysis {
            max_error_rate: 0.01,
            max_p99: Some(Duration::from_millis(300)),
            min_requests: 50,
            compare_to_stable: true,
            on_inconclusive: kiln_spec::OnInconclusive::Pause,
        }
    }

    fn w(requests: u64, errors: u64, p99_ms: f64) -> Measurement {
        Measurement {
            requests,
            errors,
            p99_ms,
        }
    }

    fn check(canary: Measurement, stable: Measurement, expect: &str) {
        let v = judge(&analysis(), StepMetrics { canary, stable });
        assert_eq!(v.to_string(), expect);
    }

    #[test]
    fn verdicts() {
        check(
            w(412, 0, 3.0),
            w(4000, 0, 3.0),
            "passed: error rate 0.0% over 412 requests, p99 3ms",
        );
        check(
            w(49, 49, 900.0),
            w(4000, 0, 3.0),
            "inconclusive: 49 requests so far",
        );
        check(
            w(412, 82, 3.0),
            w(4000, 0, 3.0),
            "error rate 19.9% over 412 requests > 1.0%",
        );
        check(
            w(412, 0, 350.0),
            w(4000, 0, 3.0),
            "p99 350ms over 412 requests > 300ms",
        );
        check(
            w(412, 0, 205.0),
            w(4000, 0, 5.0),
            "p99 205ms over 412 requests > stable's 5ms (tolerance 58ms)",
        );
        check(
            w(1000, 8, 5.0),
            w(4000, 0, 5.0),
            "error rate 0.8% over 1000 requests > stable's 0.0% + 0.5%",
        );
        // Stable is as bad: the canary is no worse, so only the absolute bound applies.
        check(
            w(1000, 8, 5.0),
            w(4000, 30, 5.0),
            "passed: error rate 0.8% over 1000 requests, p99 5ms",
        );
        // Too little stable traffic to compare: only absolute bounds.
        check(
            w(100, 0, 150.0),
            w(10, 0, 5.0),
            "passed: error rate 0.0% over 100 requests, p99 150ms",
        );
    }

    #[test]
    fn without_compare_only_absolute_bounds() {
        let mut a = analysis();
        a.compare_to_stable = false;
        let v = judge(
            &a,
            StepMetrics {
                canary: w(100, 0, 200.0),
                stable: w(100, 0, 5.0),
            },
        );
        assert!(matches!(v, Verdict::Pass { .. }), "{v}");
    }
}
