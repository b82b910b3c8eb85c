//! The sticky-session cookie: reading the release a client was given, and writing it back.
//!
//! Pure functions over header values; the route decides whether the named release may still
//! take the request.

use hyper::header::HeaderValue;

/// The cookie that remembers a client's release when an app is sticky.
pub const STICKY_COOKIE: &str = "kiln_release";

/// The release named by the sticky cookie in any of the request's `Cookie` headers.
pub(crate) fn release_from_cookies<'a>(
    cookies: impl IntoIterator<Item = &'a HeaderValue>,
) -> Option<&'a str> {
    cookies
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            if name.trim() != STICKY_COOKIE {
                return None;
            }
            let value = value.trim().trim_matches('"');
            (!value.is_empty()).then_some(value)
        })
}

/// The `Set-Cookie` value that pins a client to `release` (a validated release name, so it
/// needs no quoting).
pub(crate) fn set_cookie(release: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{STICKY_COOKIE}={release}; Path=/; HttpOnly; SameSite=Lax"
    ))
    .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn parse(headers: &[&str]) -> Option<String> {
        let values: Vec<HeaderValue> = headers
            .iter()
            .map(|h| HeaderValue::from_str(h).unwrap())
            .collect();
        release_from_cookies(&values).map(str::to_owned)
    }

    #[test]
    fn finds_the_release_among_other_cookies() {
        for (headers, want) in [
            (&["kiln_release=r2"][..], Some("r2")),
            (&["a=1; kiln_release=r3; b=2"][..], Some("r3")),
            (&["a=1", "kiln_release=\"r4\""][..], Some("r4")),
            (&["a=1;kiln_release=r5"][..], Some("r5")),
            (&["xkiln_release=r6"][..], None),
            (&["kiln_release="][..], None),
            (&["kiln_release"][..], None),
            (&[][..], None),
        ] {
            assert_eq!(parse(headers).as_deref(), want, "headers {headers:?}");
        }
    }

    #[test]
    fn the_cookie_it_sets_reads_back() {
        let set = set_cookie("r7").unwrap();
        let cookie_part = set.to_str().unwrap().split(';').next().unwrap().to_owned();
        assert_eq!(parse(&[&cookie_part]).as_deref(), Some("r7"));
    }
}
