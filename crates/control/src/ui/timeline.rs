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
/// each change of state), and their verdicts.
pub(crate) fn of_app(c: &Controller, app: &str, limit: usize) -> Result<Value> {
    let mut entries = c.events(Some(app), None)?;
    entries.retain(|e| e.kind != ROLLOUT_STORED);
    let entries = &entries[entries.len().saturating_sub(limit)..];
    let analyses: BTreeMap<u64, Value> = c
        .releases(app)?
        .into_iter()
        .map(|r| {
            let analysis = r
                .body
                .config
                .get("deploy")
                .and_then(|d| d.get("analysis"))
                .cloned()
                .unwrap_or(Value::Null);
            (r.number, analysis)
        })
        .collect();
    Ok(render(entries, &analyses))
}

/// The pure part of [`of_app`].
fn render(entries: &[kiln_ledger::Entry], analyses: &BTreeMap<u64, Value>) -> Value {
    let mut events = Vec::with_capacity(entries.len());
    let mut verdicts = Vec::new();
    // The release a step belongs to: the last rollout started before it.
    let mut rolling: Option<u64> = None;
    for e in entries {
        let event = e.event().ok();
        let text = event
            .as_ref()
            .map_or_else(|| e.kind.clone(), ToString::to_string);
        match &event {
            Some(kiln_ledger::Event::RolloutStarted { release, .. }) => rolling = Some(*release),
            Some(kiln_ledger::Event::StepJudged {
                step,
                weight,
                verdict,
            }) => {
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
            _ => {}
        }
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
        let out = render(&entries, &analyses);
        assert_eq!(out["events"].as_array().unwrap().len(), 2);
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
}
