//! What a source URL may be, and how one is shown without its secrets.
//!
//! kiln follows four kinds of source: a local path (or `file://`), `https://`, `ssh://` and
//! scp-like `user@host:path`. Everything else git knows (`git://`, plain `http://`, `ext::`)
//! is refused: unauthenticated transports would let anyone on the path change what is
//! deployed.

use gix::bstr::ByteSlice;

use crate::GitError;

/// The transports [`crate::fetch`] uses for a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A repository on this host: read directly with gix, no process, no protocol.
    Local,
    /// `https://`: gix's HTTP client.
    Https,
    /// `ssh://` or `user@host:path`: gix's SSH transport, which runs the `ssh` program.
    Ssh,
}

/// Checks that `url` names a source kiln can follow: a local path, `file://`, `https://`,
/// `ssh://` or scp-like `user@host:path`. Only the form is checked; whether a repository is
/// there is for [`crate::fetch`] to find out.
pub fn validate_url(url: &str) -> Result<(), GitError> {
    parse(url).map(|_| ())
}

/// The parsed URL and its kind; errors redact the URL.
pub(crate) fn parse(url: &str) -> Result<(gix::Url, Kind), GitError> {
    let invalid = |reason: String| GitError::InvalidUrl {
        url: redact(url),
        reason,
    };
    if url.trim().is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if url.trim() != url {
        return Err(invalid("it has leading or trailing white space".into()));
    }
    if url.chars().any(char::is_control) {
        return Err(invalid("it has a control character".into()));
    }
    let parsed = gix::url::parse(url.as_bytes().as_bstr()).map_err(|err| {
        // gix's message may quote the URL, credentials and all.
        let mut reason = err.to_string();
        if let Some(userinfo) = userinfo(url).filter(|u| !u.is_empty()) {
            reason = reason.replace(userinfo, "***");
        }
        invalid(reason.to_lowercase())
    })?;
    let kind = match parsed.scheme {
        gix::url::Scheme::File => Kind::Local,
        gix::url::Scheme::Https => Kind::Https,
        gix::url::Scheme::Ssh => Kind::Ssh,
        gix::url::Scheme::Http => {
            return Err(invalid(
                "plain http is not accepted, use https:// or ssh://".into(),
            ));
        }
        ref other => {
            return Err(invalid(format!(
                "the {} scheme is not accepted (use a path, file://, https://, ssh:// or user@host:path)",
                other.as_str()
            )));
        }
    };
    if kind != Kind::Local && parsed.host().is_none_or(str::is_empty) {
        return Err(invalid("it has no host".into()));
    }
    if parsed.path.is_empty() {
        return Err(invalid("it has no path".into()));
    }
    // gix passes a host or user starting with `-` to `ssh` after `--`, but refuse it anyway:
    // git does, and no real host is named so.
    if parsed.host().is_some_and(|h| h.starts_with('-'))
        || parsed.user().is_some_and(|u| u.starts_with('-'))
    {
        return Err(invalid("its user or host starts with '-'".into()));
    }
    Ok((parsed, kind))
}

/// `url` as it may be shown in an error or a log: no password, and for HTTP(S) no user (often
/// a token) and no query. A URL that does not parse is shown without anything between
/// `://` and the last `@` of its authority.
pub fn redact(url: &str) -> String {
    match gix::url::parse(url.as_bytes().as_bstr()) {
        Ok(parsed) => crate::without_credentials(parsed),
        Err(_) => redact_unparsed(url),
    }
}

fn redact_unparsed(url: &str) -> String {
    match userinfo(url) {
        Some(userinfo) => url.replacen(&format!("{userinfo}@"), "", 1),
        None => url.to_owned(),
    }
}

/// What stands between `://` and the last `@` of the authority, if anything does.
fn userinfo(url: &str) -> Option<&str> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some(&rest[..at])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn accepted_kinds() {
        for (url, kind) in [
            ("/srv/git/app.git", Kind::Local),
            ("relative/app", Kind::Local),
            ("file:///srv/git/app.git", Kind::Local),
            ("https://example.com/org/app.git", Kind::Https),
            ("https://user:token@example.com/org/app.git", Kind::Https),
            ("ssh://git@example.com/org/app.git", Kind::Ssh),
            ("ssh://git@example.com:2222/org/app.git", Kind::Ssh),
            ("git@example.com:org/app.git", Kind::Ssh),
        ] {
            assert_eq!(parse(url).map(|(_, k)| k).unwrap(), kind, "{url}");
            validate_url(url).unwrap();
        }
    }

    #[test]
    fn refused_kinds_say_why() {
        for (url, why) in [
            ("", "it is empty"),
            (" /srv/app", "white space"),
            ("http://example.com/app.git", "plain http"),
            ("git://example.com/app.git", "the git scheme"),
            ("https:///app.git", ""),
            ("ssh://-oProxyCommand=x/app", "'-'"),
            ("/srv/app\n", "white space"),
            ("/srv/a\u{7}pp", "control character"),
        ] {
            let err = validate_url(url).unwrap_err().to_string();
            assert!(err.starts_with("invalid source url "), "{err}");
            assert!(err.contains(why), "{url:?}: {err}");
        }
    }

    #[test]
    fn errors_never_show_a_password_or_an_http_token() {
        let err = validate_url("http://alice:s3cret@example.com/app.git")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret") && !err.contains("alice"), "{err}");
        assert_eq!(
            redact("ssh://git:pw@example.com/a"),
            "ssh://git@example.com/a"
        );
        assert_eq!(
            redact("https://tok@example.com/a?x=1"),
            "https://example.com/a"
        );
        assert_eq!(redact_unparsed("weird://u:p@h/x@y"), "weird://h/x@y");
        // A URL gix cannot parse: its message must not carry the password either.
        let err = validate_url("https://alice:s3cret@exa mple.com:x/a")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret") && !err.contains("alice"), "{err}");
        assert_eq!(redact_unparsed("/plain/path"), "/plain/path");
    }
}
