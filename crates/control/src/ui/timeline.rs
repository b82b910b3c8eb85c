//! An app's timeline for the dashboard: its ledger events as `kiln history` words them, and
//! each canary step's verdict with the numbers it was judged on and the thresholds of the
//! release judged (from that release's recorded `[deploy.analysis]`), so a failed canary
//! says why on the page.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::controller::Controller;
use crate::error::Result;

/// Events sent when the page asks for no number.
pub(crate) const DEFAULT_EVENTS: usize = 200;

/// The kind of a rollout document's entry, left out of the timeline.
const ROLLOUT_STORED: &str = "rollout.stored";

/// The most events one request gets.
pub(crate) const MAX_EVENTS: usize = 2000;

/// `app`'s last `limit` events but its rollout documents' (bookkeeping a rollout writes on
/// each change of state), their verdicts, and the numbers of its releases. For a reader
/// without the token (`detailed` false), an event that carries a program's output, an error
/// or a command line says only what it is.
pub(crate) fn of_app(c: &Controller, app: &str, limit: usize, detailed: bool) -> Result<Value> {
    let mut entries = c.events(Some(app), None)?;
    entries.retain(|e| e.kind != ROLLOUT_STORED);
    let mut numbers = Vec::new();
    let analyses: BTreeMap<u64, Value> = c
        .releases(app)?
        .into_iter()
        .map(|r| {
            numbers.push(r.number);
            (r.number, thresholds(&r.body.config))
        })
        .collect();
    let mut out = render(&entries, &analyses, limit, detailed);
    out["releases"] = json!(numbers);
    Ok(out)
}

/// The analysis a release's recorded configuration judges a canary step by: its own
/// `[deploy.analysis]`, else the defaults (marked `"default": true`).
fn thresholds(config: &Value) -> Value {
    match config.get("deploy").and_then(|d| d.get("analysis")) {
        Some(a) if !a.is_null() => a.clone(),
        _ => {
            let mut v =
                serde_json::to_value(crate::config::default_analysis()).unwrap_or(Value::Null);
            v["default"] = json!(true);
            v
        }
    }
}

/// Keys of an event's data that hold what a program printed, an error or a command line.
const DETAIL_KEYS: &[&str] = &["output", "error", "command", "stderr"];

/// The pure part of [`of_app`]: every entry is walked (a verdict's release is that of the
/// last rollout started before it, however far back), the last `limit` are returned.
fn render(
    entries: &[kiln_ledger::Entry],
    analyses: &BTreeMap<u64, Value>,
    limit: usize,
    detailed: bool,
) -> Value {
    let first = entries.len().saturating_sub(limit);
    let mut events = Vec::with_capacity(entries.len() - first);
    let mut verdicts = Vec::new();
    let mut rolling: Option<u64> = None;
    for (i, e) in entries.iter().enumerate() {
        let event = e.event().ok();
        if let Some(kiln_ledger::Event::RolloutStarted { release, .. }) = &event {
            rolling = Some(*release);
        }
        if i < first {
            continue;
        }
        if let Some(kiln_ledger::Event::StepJudged {
            step,
            weight,
            verdict,
        }) = &event
        {
            let m = &verdict.metrics;
            verdicts.push(json!({
                "seq": e.seq,
                "at_ms": e.at_ms,
                "release": rolling,
                "step": step,
                "weight": weight,
                "verdict": verdict.verdict,
                "reason": verdict.reason,
                "canary": measurement(&m.canary),
                "stable": measurement(&m.stable),
                "thresholds": rolling.and_then(|r| analyses.get(&r)).cloned().unwrap_or(Value::Null),
            }));
        }
        let withheld = !detailed && DETAIL_KEYS.iter().any(|k| e.data.get(*k).is_some());
        let text = match &event {
            _ if withheld => format!("{} (details with the token)", e.kind),
            Some(event) => event.to_string(),
            None => e.kind.clone(),
        };
        events.push(json!({
            "seq": e.seq,
            "at_ms": e.at_ms,
            "kind": e.kind,
            "text": text,
            "actor": e.data.get("actor"),
        }));
    }
    json!({"events": events, "verdicts": verdicts})
}

fn measurement(m: &kiln_ledger::Measurement) -> Value {
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    let error_rate = if m.requests == 0 {
        0.0
    } else {
        m.errors as f64 / m.requests as f64
    };
    json!({
        "requests": m.requests,
        "errors": m.errors,
        "error_rate": error_rate,
        "p99_ms": m.p99_ms,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(seq: u64, event: &kiln_ledger::Event) -> kiln_ledger::Entry {
        let v = serde_json::to_value(event).unwrap();
        kiln_ledger::Entry {
            seq,
            at_ms: 1000 * i64::try_from(seq).unwrap(),
            app: "web".to_owned(),
            kind: v["kind"].as_str().unwrap().to_owned(),
            data: v["data"].clone(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn a_verdict_carries_its_numbers_and_the_thresholds_of_the_release_judged() {
        let m = |requests, errors, p99_ms| kiln_ledger::Measurement {
            requests,
            errors,
            p99_ms,
        };
        let entries = [
            entry(
                1,
                &kiln_ledger::Event::RolloutStarted {
                    release: 3,
                    stable: Some(2),
                    strategy: "canary".to_owned(),
                    image: "sha256:00".to_owned(),
                },
            ),
            entry(
                2,
                &kiln_ledger::Event::StepJudged {
                    step: 1,
                    weight: 10,
                    verdict: kiln_ledger::Verdict {
                        verdict: "fail".to_owned(),
                        reason: Some("error rate 20.0% > 1.0%".to_owned()),
                        metrics: kiln_ledger::StepMetrics {
                            canary: m(50, 10, 4.5),
                            stable: m(450, 0, 3.0),
                        },
                    },
                },
            ),
        ];
        let analyses = BTreeMap::from([
            (2, json!({"max_error_rate": 0.5})),
            (3, json!({"max_error_rate": 0.01, "max_p99_ms": 200})),
        ]);
        let out = render(&entries, &analyses, 100, true);
        assert_eq!(out["events"].as_array().unwrap().len(), 2);
        // The rollout that started it is out of the window, and still names the release.
        let last = render(&entries, &analyses, 1, true);
        assert_eq!(last["events"].as_array().unwrap().len(), 1);
        assert_eq!(last["verdicts"][0]["release"], 3);
        assert!(
            out["events"][1]["text"].as_str().unwrap().contains("fail"),
            "{out}"
        );
        let v = &out["verdicts"][0];
        assert_eq!(v["release"], 3);
        assert_eq!(v["verdict"], "fail");
        assert_eq!(v["canary"]["error_rate"], 0.2);
        assert_eq!(v["stable"]["requests"], 450);
        assert_eq!(v["thresholds"]["max_error_rate"], 0.01);
        assert_eq!(v["thresholds"]["max_p99_ms"], 200);
    }

    #[test]
    fn a_release_without_analysis_is_judged_by_the_defaults_and_says_so() {
        let t = thresholds(&json!({"deploy": {"analysis": null}}));
        assert_eq!(t["max_error_rate"], 0.01);
        assert_eq!(t["min_requests"], 50);
        assert_eq!(t["compare_to_stable"], true);
        assert_eq!(t["default"], true);
        let own = thresholds(&json!({"deploy": {"analysis": {"max_error_rate": 0.05}}}));
        assert_eq!(own, json!({"max_error_rate": 0.05}));
    }

    #[test]
    fn output_and_errors_are_withheld_from_a_reader_without_the_token() {
        let e = kiln_ledger::Entry {
            seq: 7,
            at_ms: 0,
            app: "web".to_owned(),
            kind: "migration.failed".to_owned(),
            data: json!({"error": "cannot reach postgres://app:hunter2@db"}),
            prev_hash: String::new(),
            hash: String::new(),
        };
        let anonymous = render(std::slice::from_ref(&e), &BTreeMap::new(), 10, false);
        let text = anonymous["events"][0]["text"].as_str().unwrap();
        assert_eq!(text, "migration.failed (details with the token)");
        assert!(!anonymous.to_string().contains("hunter2"), "{anonymous}");
    }
}
