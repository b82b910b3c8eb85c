//! Host routing: which app on a listen address answers a request, by its `Host`.
//!
//! Pure data: built once per listener from the apps' host names, then only read. An unknown
//! host finds no app (the listener answers 404); it never falls through to an arbitrary app.
//!
//! A host name is exact (`shop.example.com`) or a wildcard (`*.example.com`, which matches
//! any name ending in `.example.com` — `a.example.com`, `a.b.example.com` — but not
//! `example.com` itself). An exact name wins over every wildcard, and the longest matching
//! wildcard suffix wins over shorter ones (`*.eu.example.com` over `*.example.com`).

use std::collections::HashMap;

use crate::error::ConfigError;

/// Maps normalised host names to app indexes.
#[derive(Debug, Default)]
pub(crate) struct HostTable {
    exact: HashMap<String, usize>,
    /// Wildcards by their suffix with its leading dot (`.example.com` for `*.example.com`).
    wildcard: HashMap<String, usize>,
    /// The app that answers every host: set only when a lone app declared no host names.
    default: Option<usize>,
}

impl HostTable {
    /// Builds the table from `(app name, host names)` in listener order.
    pub(crate) fn build<'a>(
        apps: impl IntoIterator<Item = (&'a str, &'a [String])>,
    ) -> Result<HostTable, ConfigError> {
        let apps: Vec<(&str, &[String])> = apps.into_iter().collect();
        let mut table = HostTable::default();
        let mut owner: HashMap<String, &str> = HashMap::new();
        let mut names: Vec<&str> = Vec::new();
        for (index, (app, hosts)) in apps.iter().enumerate() {
            if names.contains(app) {
                return Err(ConfigError::DuplicateApp {
                    app: (*app).to_owned(),
                });
            }
            names.push(app);
            if hosts.is_empty() {
                if apps.len() > 1 {
                    return Err(ConfigError::AppWithoutHosts {
                        app: (*app).to_owned(),
                    });
                }
                table.default = Some(index);
            }
            for host in *hosts {
                let normal = normalise(host).filter(|h| valid_host(h)).ok_or_else(|| {
                    ConfigError::InvalidHost {
                        app: (*app).to_owned(),
                        host: host.clone(),
                    }
                })?;
                if let Some(first) = owner.get(&normal) {
                    return Err(ConfigError::DuplicateHost {
                        host: normal,
                        first: (*first).to_owned(),
                        second: (*app).to_owned(),
                    });
                }
                owner.insert(normal.clone(), app);
                match normal.strip_prefix('*') {
                    Some(suffix) => table.wildcard.insert(suffix.to_owned(), index),
                    None => table.exact.insert(normal, index),
                };
            }
        }
        Ok(table)
    }

    /// The app for a request whose host (from `Host` or the URI authority) is `host`.
    pub(crate) fn lookup(&self, host: Option<&str>) -> Option<usize> {
        if let Some(index) = self.default {
            return Some(index);
        }
        let host = host?;
        // Most requests already carry a lowercase host without a port: look it up without
        // allocating first.
        if let Some(&index) = self.exact.get(host) {
            return Some(index);
        }
        let normal = normalise(host)?;
        if let Some(&index) = self.exact.get(&normal) {
            return Some(index);
        }
        self.wildcard_match(&normal)
    }

    /// The app of the longest wildcard suffix of `host` (already normalised): each dot that
    /// has at least one character before it starts a candidate suffix, and the leftmost dot
    /// gives the longest one.
    fn wildcard_match(&self, host: &str) -> Option<usize> {
        if self.wildcard.is_empty() {
            return None;
        }
        host.char_indices()
            .filter(|&(i, c)| c == '.' && i > 0)
            .find_map(|(i, _)| host.get(i..).and_then(|suffix| self.wildcard.get(suffix)))
            .copied()
    }
}

/// Whether a request's host is a host name or an IP literal, with an optional port: letters,
/// digits, `.`, `-` and `_` (no `..`), or `[` hex digits, `:` and `.` `]`; then `:` and digits
/// or nothing. Stricter than RFC 3986's `reg-name`, whose sub-delimiters and percent-encoding
/// no DNS name uses: a host that other parsers would split differently (`evil.test:x.example.com`
/// is `evil.test` to many URL libraries) must not match `*.example.com` and reach an instance
/// that builds its links from it; nor may a `/`, a space or a quote get through.
pub(crate) fn is_request_host(host: &[u8]) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let (literal, after) = rest.split_at(end);
        let literal_ok = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !literal_ok {
            return false;
        }
        (&b""[..], &after[1..])
    } else {
        match host.iter().position(|&b| b == b':') {
            Some(colon) => (&host[..colon], &host[colon..]),
            None => (host, &b""[..]),
        }
    };
    let name_ok = name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && !name.windows(2).any(|w| w == b"..");
    let port_ok = match port.strip_prefix(b":") {
        Some(digits) => digits.iter().all(u8::is_ascii_digit),
        None => port.is_empty(),
    };
    name_ok && port_ok
}

/// Lowercases a host and strips its port and a trailing dot; `None` when nothing is left.
pub(crate) fn normalise(host: &str) -> Option<String> {
    let host = host.trim();
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal keeps its brackets so that it cannot be confused with a port.
        let end = rest.find(']')?;
        &host[..end + 2]
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let trimmed = without_port.strip_suffix('.').unwrap_or(without_port);
    if trimmed.is_empty() {
        None
    } else {
        Some(trimmed.to_ascii_lowercase())
    }
}

fn valid_host(host: &str) -> bool {
    // A wildcard is `*.` before an ordinary name; a `*` anywhere else is not a host.
    let name = match host.strip_prefix("*.") {
        Some(rest) if !rest.is_empty() && !rest.starts_with('.') && !rest.starts_with('[') => rest,
        Some(_) => return false,
        None => host,
    };
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':'))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_request_host_is_a_host_name_an_ip_literal_or_either_with_a_port() {
        for good in [
            "shop.example.com",
            "Shop.Example.com:8080",
            "127.0.0.1:80",
            "[::1]:443",
            "xn--bcher-kva.example",
            "under_score.example",
            "trailing.dot.example.",
            "example.com:",
            "[2001:db8::1]",
            "[::ffff:10.0.0.1]:8080",
            "",
        ] {
            assert!(is_request_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "evil.test:x.example.com",
            "evil.test,x.example.com",
            "evil.test;x.example.com",
            "evil%2etest.example.com",
            "example.com:80:80",
            "example.com:8o",
            "[::1",
            "[zz::1]",
            "[::1]x",
            "evil.test/.example.com",
            "evil.test .example.com",
            "a\", for=6.6.6.6",
            "a\\b.example.com",
            "a..example.com",
            "user@example.com",
            "example.com?x",
            "example.com#x",
            "\u{e9}.example.com",
            "tab\t.example.com",
        ] {
            assert!(!is_request_host(bad.as_bytes()), "{bad:?}");
        }
    }

    fn table(apps: &[(&str, &[&str])]) -> Result<HostTable, ConfigError> {
        let owned: Vec<(String, Vec<String>)> = apps
            .iter()
            .map(|(a, hs)| {
                (
                    (*a).to_owned(),
                    hs.iter().map(|h| (*h).to_owned()).collect(),
                )
            })
            .collect();
        HostTable::build(owned.iter().map(|(a, hs)| (a.as_str(), hs.as_slice())))
    }

    #[test]
    fn routes_by_host_ignoring_case_port_and_trailing_dot() {
        let t = table(&[("shop", &["shop.example"]), ("blog", &["Blog.Example"])]).unwrap();
        for (host, want) in [
            (Some("shop.example"), Some(0)),
            (Some("SHOP.example:8080"), Some(0)),
            (Some("blog.example."), Some(1)),
            (Some("other.example"), None),
            (None, None),
            (Some(""), None),
        ] {
            assert_eq!(t.lookup(host), want, "host {host:?}");
        }
    }

    #[test]
    fn a_lone_app_without_hosts_answers_every_host() {
        let t = table(&[("only", &[])]).unwrap();
        assert_eq!(t.lookup(Some("anything.example")), Some(0));
        assert_eq!(t.lookup(None), Some(0));
    }

    #[test]
    fn a_lone_app_with_hosts_does_not_answer_other_hosts() {
        let t = table(&[("only", &["a.example"])]).unwrap();
        assert_eq!(t.lookup(Some("b.example")), None);
    }

    #[test]
    fn an_app_without_hosts_among_others_is_refused() {
        let err = table(&[("a", &["a.example"]), ("b", &[])]).unwrap_err();
        assert!(matches!(err, ConfigError::AppWithoutHosts { app } if app == "b"));
    }

    #[test]
    fn a_host_claimed_twice_is_refused() {
        let err = table(&[("a", &["x.example"]), ("b", &["X.example:443"])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"host "x.example" is claimed by both app "a" and app "b""#
        );
    }

    #[test]
    fn invalid_host_and_duplicate_app_are_refused() {
        assert!(matches!(
            table(&[("a", &["bad host"])]).unwrap_err(),
            ConfigError::InvalidHost { .. }
        ));
        assert!(matches!(
            table(&[("a", &["a.example"]), ("a", &["b.example"])]).unwrap_err(),
            ConfigError::DuplicateApp { .. }
        ));
    }

    #[test]
    fn exact_names_win_over_wildcards_and_longer_wildcards_over_shorter() {
        let t = table(&[
            ("any", &["*.example.com"]),
            ("eu", &["*.EU.example.com"]),
            ("shop", &["shop.eu.example.com", "example.com"]),
        ])
        .unwrap();
        for (host, want) in [
            (Some("a.example.com"), Some(0)),
            (Some("a.b.example.com:8080"), Some(0)),
            (Some("x.eu.example.com"), Some(1)),
            (Some("y.x.eu.example.com."), Some(1)),
            // `*.eu.example.com` does not cover `eu.example.com`; `*.example.com` does.
            (Some("eu.example.com"), Some(0)),
            (Some("shop.eu.example.com"), Some(2)),
            (Some("SHOP.eu.example.com"), Some(2)),
            // A wildcard needs at least one label before its suffix.
            (Some("example.com"), Some(2)),
            (Some(".example.com"), None),
            (Some("example.org"), None),
            (Some("badexample.com"), None),
        ] {
            assert_eq!(t.lookup(host), want, "host {host:?}");
        }
    }

    #[test]
    fn malformed_wildcards_and_duplicate_wildcards_are_refused() {
        for host in [
            "*",
            "*.",
            "*example.com",
            "a.*.example.com",
            "*..example.com",
            "**.x",
        ] {
            assert!(
                matches!(
                    table(&[("a", &[host])]).unwrap_err(),
                    ConfigError::InvalidHost { .. }
                ),
                "{host:?}"
            );
        }
        let err = table(&[("a", &["*.x.example"]), ("b", &["*.X.example"])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"host "*.x.example" is claimed by both app "a" and app "b""#
        );
    }

    #[test]
    fn ipv6_literals_keep_their_brackets() {
        assert_eq!(normalise("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(normalise("[::1]").as_deref(), Some("[::1]"));
    }
}
