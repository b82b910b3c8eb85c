//! What `kiln plan` prints: the changes `kiln apply` would make, from the app as it runs and
//! the release `kiln.toml` describes.
//!
//! The configuration is compared as JSON values (the control crate's serde form of a
//! release's configuration), key by key, so this crate does not depend on that format.
//!
//! **API boundary:** no daemon, no image build: the caller gathers both sides.

use std::fmt;

use kiln_spec::Migrate;
use serde_json::Value;

use crate::rollback::LiveSchema;

/// The app as it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanCurrent {
    /// The release being (or last) rolled out.
    pub release: u64,
    /// The release taking traffic.
    pub live: Option<u64>,
    /// The image of `release`.
    pub image: String,
    /// The configuration of `release`, as JSON.
    pub config: Value,
    /// The live database schema, when a migration recorded one.
    pub schema: Option<LiveSchema>,
}

/// The release `kiln apply` would record.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanNext {
    /// The app.
    pub app: String,
    /// The image it would run.
    pub image: String,
    /// Its configuration, as JSON (the same form as [`PlanCurrent::config`]).
    pub config: Value,
    /// Instances.
    pub replicas: u32,
    /// The rollout strategy's name as written in `kiln.toml`.
    pub strategy: String,
    /// Where the router listens.
    pub listen: String,
    /// `[deploy.migrate]`.
    pub migrate: Option<Migrate>,
}

/// One change `kiln apply` would make; `Display` is the line `kiln plan` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The app does not run yet.
    NewApp {
        /// The app.
        app: String,
        /// The image.
        image: String,
        /// Instances.
        replicas: u32,
        /// The strategy's name.
        strategy: String,
        /// Where the router would listen.
        listen: String,
    },
    /// Another image.
    Image {
        /// The current image.
        from: String,
        /// The new one.
        to: String,
    },
    /// A configuration value changed, appeared (`from` is `null`) or went (`to` is `null`).
    Config {
        /// Its dotted path, like `service.env.A`.
        key: String,
        /// The current value, as JSON.
        from: String,
        /// The new value, as JSON.
        to: String,
    },
    /// The release runs a migration.
    Schema {
        /// The live schema, when one is recorded.
        live: Option<u32>,
        /// The schema after the migration.
        to: u32,
        /// The oldest schema the new release's code works with.
        compatible_from: u32,
        /// Releases a rollback to which the new schema would refuse.
        blocks_rollback_to: Vec<u64>,
        /// The schema those releases need, at most.
        blocked_schema: u32,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::NewApp {
                app,
                image,
                replicas,
                strategy,
                listen,
            } => write!(
                f,
                "+ new app {app}: release 1, image {image}, {replicas} instance(s), {strategy}, \
                 listening on {listen}"
            ),
            Change::Image { from, to } => write!(f, "~ image: {from} → {to}"),
            Change::Config { key, from, to } => config_line(f, key, from, to),
            Change::Schema {
                live,
                to,
                compatible_from,
                blocks_rollback_to,
                blocked_schema,
            } => {
                f.write_str("~ schema: live ")?;
                match live {
                    Some(live) => write!(f, "{live}")?,
                    None => f.write_str("none recorded")?,
                }
                write!(f, " → {to} (works with schema {compatible_from} or later)")?;
                if !blocks_rollback_to.is_empty() {
                    let releases: Vec<String> =
                        blocks_rollback_to.iter().map(u64::to_string).collect();
                    write!(
                        f,
                        "; after it, rolling back to release {} will be refused (it needs schema \
                         {blocked_schema} or older)",
                        releases.join(", ")
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// A configuration change as `kiln plan` prints it. Secrets show their source, never a
/// fingerprint or value; an env value whose name looks secret (the daemon shows it as
/// `redacted:…`) shows only that it changed.
fn config_line(f: &mut fmt::Formatter<'_>, key: &str, from: &str, to: &str) -> fmt::Result {
    if let Some(rest) = key.strip_prefix("service.secrets.") {
        let (name, field) = rest.split_once('.').unwrap_or((rest, ""));
        let source = |json: &str| {
            serde_json::from_str::<Value>(json)
                .ok()
                .map(|v| v["source"].to_string())
                .unwrap_or_default()
        };
        return match (field, from, to) {
            ("", "null", _) => write!(f, "+ secret {name} from {}", source(to)),
            ("", _, "null") => write!(f, "- secret {name}"),
            ("fingerprint", _, _) => write!(f, "~ secret {name} changed (the value is not shown)"),
            _ => write!(f, "~ secret {name}: {field}: {from} → {to}"),
        };
    }
    let redacted = |json: &str| json.starts_with("\"redacted:");
    if redacted(from) || redacted(to) {
        return write!(
            f,
            "~ {key} changed (not shown: the name looks secret; move it to [service.secrets])"
        );
    }
    write!(f, "~ {key}: {from} → {to}")
}

/// The changes applying `next` would make to `current` (`None`: the app does not run), in
/// the order `kiln plan` prints them: image, configuration, schema.
pub fn plan(current: Option<&PlanCurrent>, next: &PlanNext) -> Vec<Change> {
    let Some(current) = current else {
        return vec![Change::NewApp {
            app: next.app.clone(),
            image: next.image.clone(),
            replicas: next.replicas,
            strategy: next.strategy.clone(),
            listen: next.listen.clone(),
        }];
    };
    let mut changes = Vec::new();
    if current.image != next.image {
        changes.push(Change::Image {
            from: current.image.clone(),
            to: next.image.clone(),
        });
    }
    changes.extend(
        config_diff(&current.config, &next.config)
            .into_iter()
            .map(|(key, from, to)| Change::Config { key, from, to }),
    );
    if let Some(m) = &next.migrate {
        let live = current.schema.map(|l| l.schema);
        // FIXME: this takes the live schema for the schema the live release needs, so it
        // also warns when the live release states no schema, which a rollback lets through,
        // or when no schema is recorded ("needs schema 0 or older").
        let blocked_schema = live.unwrap_or(0);
        let blocks_rollback_to = current
            .live
            .into_iter()
            .filter(|_| m.compatible_from > blocked_schema)
            .collect();
        changes.push(Change::Schema {
            live,
            to: m.schema,
            compatible_from: m.compatible_from,
            blocks_rollback_to,
            blocked_schema,
        });
    }
    changes
}

/// The values that differ between two configurations, as (dotted key, old, new) with the
/// values as JSON text, keys in order. Objects are compared key by key (a missing key is
/// `null`); anything else, arrays included, as a whole.
pub fn config_diff(before: &Value, after: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    diff_values("", before, after, &mut out);
    out
}

fn diff_values(path: &str, a: &Value, b: &Value, out: &mut Vec<(String, String, String)>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_values(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push((path.to_owned(), a.to_string(), b.to_string())),
        _ => {}
    }
}
