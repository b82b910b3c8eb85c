//! What a registry request asks for, from its method, path and `Range` header: pure parsing,
//! no I/O. A path is taken as sent (nothing is percent-decoded), so `%2e%2e` is just an invalid
//! name; a digest is a [`Digest`], which cannot hold `/` or `..`, before anything looks it up.

use kiln_runtime::Digest;

/// The longest repository name accepted: what the Docker reference grammar allows.
pub const MAX_NAME: usize = 255;

/// The first component of every repository name kiln serves: `kiln/<app>`.
pub const NAME_PREFIX: &str = "kiln";

/// One request to the registry, as far as the path and method say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /v2/`: the API version check.
    Base,
    /// `GET|HEAD /v2/<name>/manifests/<digest>`.
    Manifest {
        /// The repository name, checked.
        name: String,
        /// The manifest asked for.
        digest: Digest,
    },
    /// `GET|HEAD /v2/<name>/blobs/<digest>`.
    Blob {
        /// The repository name, checked.
        name: String,
        /// The blob asked for.
        digest: Digest,
    },
    /// `GET|HEAD /v2/<name>/referrers/<digest>`: the OCI referrers API.
    Referrers {
        /// The repository name, checked.
        name: String,
        /// The image whose referrers are asked for.
        subject: Digest,
    },
    /// `GET|HEAD /v2/<name>/manifests/sha256-<hex>`: the OCI referrers-tag fallback, the one
    /// tag kiln's registry resolves.
    ReferrersTag {
        /// The repository name, checked.
        name: String,
        /// The image the tag names.
        subject: Digest,
    },
}

/// Why a request cannot be served: each becomes the distribution spec's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not under `/v2/` at all, or an endpoint kiln does not serve (tag lists, the catalog…).
    NotFound(String),
    /// A method that would write (push, delete) or is not HTTP's read.
    Unsupported(String),
    /// The name breaks the distribution spec's grammar.
    NameInvalid(String),
    /// A valid name outside `kiln/<app>`.
    NameUnknown(String),
    /// A manifest asked for by tag: kiln serves by digest only.
    ManifestByTag(String),
    /// Not a `sha256:` digest.
    DigestInvalid(String),
}

/// Parses a request: `read` is whether the method is GET or HEAD.
pub fn parse(read: bool, path: &str) -> Result<Request, Refusal> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Err(Refusal::NotFound(format!(
            "{} is not a registry path (they start with /v2/)",
            shown(path)
        )));
    };
    if !read {
        return Err(Refusal::Unsupported(
            "kiln's registry is read-only: it serves manifests and blobs to pull, never a \
             push or a delete"
                .to_owned(),
        ));
    }
    if rest.is_empty() || rest == "/" {
        return Ok(Request::Base);
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Err(Refusal::NotFound(format!(
            "{} is not a registry path",
            shown(path)
        )));
    };
    // `<name>/<kind>/<reference>`: the name may itself hold `/`, the last two segments never.
    let mut segments = rest.rsplitn(3, '/');
    let (reference, kind, name) = match (segments.next(), segments.next(), segments.next()) {
        (Some(r), Some(k), Some(n)) => (r, k, n),
        _ => return Err(unserved(path)),
    };
    if kind != "manifests" && kind != "blobs" && kind != "referrers" {
        return Err(unserved(path));
    }
    let name = check_name(name)?;
    match kind {
        "referrers" => Ok(Request::Referrers {
            name,
            subject: digest(reference)?,
        }),
        "manifests" => {
            if let Some(hex) = reference.strip_prefix("sha256-")
                && let Ok(subject) = Digest::parse(&format!("sha256:{hex}"))
            {
                return Ok(Request::ReferrersTag { name, subject });
            }
            if !reference.contains(':') && is_tag(reference) {
                return Err(Refusal::ManifestByTag(format!(
                    "manifest {} asked for by tag: kiln's registry serves manifests by \
                     digest only (NAME@sha256:…), and referrers by their tag sha256-<hex>",
                    shown(reference)
                )));
            }
            Ok(Request::Manifest {
                name,
                digest: digest(reference)?,
            })
        }
        _ => Ok(Request::Blob {
            name,
            digest: digest(reference)?,
        }),
    }
}

fn unserved(path: &str) -> Refusal {
    Refusal::NotFound(format!(
        "kiln's registry serves only /v2/, /v2/<name>/manifests/<digest>, \
         /v2/<name>/blobs/<digest> and /v2/<name>/referrers/<digest>, not {}",
        shown(path)
    ))
}

fn digest(s: &str) -> Result<Digest, Refusal> {
    Digest::parse(s).map_err(|_| {
        Refusal::DigestInvalid(format!(
            "digest {}: expected sha256: followed by 64 lowercase hex digits",
            shown(s)
        ))
    })
}

/// The distribution spec's tag grammar: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let mut bytes = s.bytes();
    s.len() <= 128
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks a repository name: the distribution spec's grammar (components of lowercase letters
/// and digits, separated inside by `.`, `_`, `__` or runs of `-`; joined by `/`), at most
/// [`MAX_NAME`] bytes, and kiln's own rule that it is `kiln/<app>`. The app part names
/// nothing kiln checks: content is found by digest alone.
pub fn check_name(name: &str) -> Result<String, Refusal> {
    if name.len() > MAX_NAME {
        return Err(Refusal::NameInvalid(format!(
            "repository name of {} bytes: at most {MAX_NAME}",
            name.len()
        )));
    }
    if !is_name(name) {
        return Err(Refusal::NameInvalid(format!(
            "repository name {}: components of lowercase letters and digits, separated by \
             `.`, `_`, `__` or `-`, joined by `/`",
            shown(name)
        )));
    }
    match name.split_once('/') {
        Some((NAME_PREFIX, app)) if !app.contains('/') => Ok(name.to_owned()),
        _ => Err(Refusal::NameUnknown(format!(
            "repository {}: kiln's registry serves {NAME_PREFIX}/<app> only",
            shown(name)
        ))),
    }
}

/// Whether `name` matches the distribution spec's `<name>` grammar.
pub fn is_name(name: &str) -> bool {
    !name.is_empty() && name.split('/').all(kiln_spec::rules::path_component)
}

/// The repository an app's images are pulled as: `kiln/<app>`, with what the grammar does not
/// allow (an app name ending in `-`, say) trimmed; `kiln/app` if nothing is left.
pub fn repository(app: &str) -> String {
    let candidate = format!("{NAME_PREFIX}/{}", app.trim_end_matches('-'));
    if is_name(&candidate) && candidate.len() <= MAX_NAME {
        candidate
    } else {
        format!("{NAME_PREFIX}/app")
    }
}

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The whole blob (no header, or one kiln ignores as RFC 9110 allows: several ranges,
    /// another unit, a malformed value).
    Whole,
    /// Bytes `start..end` (end exclusive, never empty).
    Part {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A range that lies past the end: 416.
    Unsatisfiable,
}

/// Parses a `Range` header against a blob of `size` bytes: `bytes=A-B`, `bytes=A-` or
/// `bytes=-N`, one range only.
pub fn parse_range(header: Option<&str>, size: u64) -> Range {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Whole;
    };
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|x| x.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), number(a), number(b)) {
        // `-N`: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                Range::Unsatisfiable
            } else {
                Range::Part {
                    start: size.saturating_sub(n),
                    end: size,
                }
            }
        }
        (false, Some(start), end) if b.is_empty() || end.is_some() => {
            if start >= size {
                return Range::Unsatisfiable;
            }
            match end {
                Some(last) if last < start => Range::Whole,
                Some(last) => Range::Part {
                    start,
                    end: last.saturating_add(1).min(size),
                },
                None => Range::Part { start, end: size },
            }
        }
        _ => Range::Whole,
    }
}

/// At most 80 characters of what a client sent, quoted, for messages.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(80).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn kind(r: &Result<Request, Refusal>) -> String {
        match r {
            Ok(Request::Base) => "base".to_owned(),
            Ok(Request::Manifest { name, digest }) => format!("manifest {name} {}", digest.short()),
            Ok(Request::Blob { name, digest }) => format!("blob {name} {}", digest.short()),
            Ok(Request::Referrers { name, subject }) => {
                format!("referrers {name} {}", subject.short())
            }
            Ok(Request::ReferrersTag { name, subject }) => {
                format!("referrers tag {name} {}", subject.short())
            }
            Err(Refusal::NotFound(_)) => "404 not found".to_owned(),
            Err(Refusal::Unsupported(_)) => "405 UNSUPPORTED".to_owned(),
            Err(Refusal::NameInvalid(_)) => "400 NAME_INVALID".to_owned(),
            Err(Refusal::NameUnknown(_)) => "404 NAME_UNKNOWN".to_owned(),
            Err(Refusal::ManifestByTag(_)) => "404 MANIFEST_UNKNOWN".to_owned(),
            Err(Refusal::DigestInvalid(_)) => "400 DIGEST_INVALID".to_owned(),
        }
    }

    #[test]
    fn paths() {
        let long = format!("/v2/kiln/{}/blobs/{D}", "a".repeat(300));
        let cases: &[(bool, &str, &str)] = &[
            (true, "/v2/", "base"),
            (true, "/v2", "base"),
            (
                true,
                &format!("/v2/kiln/web/manifests/{D}"),
                "manifest kiln/web 0123456789ab",
            ),
            (
                true,
                &format!("/v2/kiln/web/blobs/{D}"),
                "blob kiln/web 0123456789ab",
            ),
            (
                true,
                "/v2/kiln/web/manifests/latest",
                "404 MANIFEST_UNKNOWN",
            ),
            (
                true,
                "/v2/kiln/web/manifests/sha256:abc",
                "400 DIGEST_INVALID",
            ),
            (true, "/v2/kiln/web/blobs/latest", "400 DIGEST_INVALID"),
            (
                true,
                &format!("/v2/kiln/web/referrers/{D}"),
                "referrers kiln/web 0123456789ab",
            ),
            (
                true,
                "/v2/kiln/web/referrers/sha256:abc",
                "400 DIGEST_INVALID",
            ),
            (true, "/v2/kiln/web/referrers/latest", "400 DIGEST_INVALID"),
            (
                true,
                &format!("/v2/kiln/web/manifests/{}", D.replace(':', "-")),
                "referrers tag kiln/web 0123456789ab",
            ),
            (
                true,
                "/v2/kiln/web/manifests/sha256-abc",
                "404 MANIFEST_UNKNOWN",
            ),
            (
                false,
                &format!("/v2/kiln/web/manifests/{}", D.replace(':', "-")),
                "405 UNSUPPORTED",
            ),
            (
                true,
                "/v2/kiln/web/blobs/sha256:../../../etc/passwd",
                "404 not found",
            ),
            (
                true,
                "/v2/kiln/web/blobs/..%2f..%2fetc%2fpasswd",
                "400 DIGEST_INVALID",
            ),
            (true, "/v2/kiln/web/blobs/sha256:..", "400 DIGEST_INVALID"),
            (
                true,
                &format!("/v2/kiln/web/blobs/{}", D.to_uppercase()),
                "400 DIGEST_INVALID",
            ),
            (
                true,
                &format!("/v2/../../etc/blobs/{D}"),
                "400 NAME_INVALID",
            ),
            (
                true,
                &format!("/v2/kiln/%2e%2e/blobs/{D}"),
                "400 NAME_INVALID",
            ),
            (
                true,
                &format!("/v2/kiln//web/blobs/{D}"),
                "400 NAME_INVALID",
            ),
            (true, &format!("/v2/Kiln/web/blobs/{D}"), "400 NAME_INVALID"),
            (
                true,
                &format!("/v2/library/web/blobs/{D}"),
                "404 NAME_UNKNOWN",
            ),
            (true, &format!("/v2/web/blobs/{D}"), "404 NAME_UNKNOWN"),
            (true, &format!("/v2/kiln/a/b/blobs/{D}"), "404 NAME_UNKNOWN"),
            (true, &long, "400 NAME_INVALID"),
            (true, "/v2/kiln/web/tags/list", "404 not found"),
            (true, "/v2/_catalog", "404 not found"),
            (true, "/etc/passwd", "404 not found"),
            (true, "/v2x", "404 not found"),
            (false, "/v2/kiln/web/blobs/uploads/", "405 UNSUPPORTED"),
            (
                false,
                &format!("/v2/kiln/web/manifests/{D}"),
                "405 UNSUPPORTED",
            ),
        ];
        for (read, path, want) in cases {
            assert_eq!(kind(&parse(*read, path)), *want, "{path}");
        }
    }

    #[test]
    fn name_grammar() {
        for good in [
            "kiln/web", "a", "a/b/c", "a.b", "a_b", "a__b", "a---b", "0/9", "a-b.c_d",
        ] {
            assert!(is_name(good), "{good}");
        }
        for bad in [
            "",
            "/",
            "a/",
            "/a",
            "A",
            "a..b",
            "a___b",
            "a-",
            "-a",
            "a.",
            "_a",
            "a b",
            "a/../b",
            "a%2fb",
            "a._b",
            "a\u{e9}b",
            "\u{e9}",
            "a\u{2014}-b",
        ] {
            assert!(!is_name(bad), "{bad}");
        }
    }

    #[test]
    fn repositories_of_app_names_are_valid() {
        assert_eq!(repository("web"), "kiln/web");
        assert_eq!(repository("web-api"), "kiln/web-api");
        assert_eq!(repository("web-"), "kiln/web");
        assert_eq!(repository("-"), "kiln/app");
        assert_eq!(repository("Web"), "kiln/app");
    }

    #[test]
    fn ranges() {
        use Range::*;
        let cases: &[(Option<&str>, u64, Range)] = &[
            (None, 10, Whole),
            (Some("bytes=0-4"), 10, Part { start: 0, end: 5 }),
            (Some("bytes=5-"), 10, Part { start: 5, end: 10 }),
            (Some("bytes=5-100"), 10, Part { start: 5, end: 10 }),
            (Some("bytes=-3"), 10, Part { start: 7, end: 10 }),
            (Some("bytes=-30"), 10, Part { start: 0, end: 10 }),
            (Some("bytes=9-9"), 10, Part { start: 9, end: 10 }),
            (Some("bytes=10-"), 10, Unsatisfiable),
            (Some("bytes=10-20"), 10, Unsatisfiable),
            (Some("bytes=-0"), 10, Unsatisfiable),
            (Some("bytes=0-"), 0, Unsatisfiable),
            (Some("bytes=5-4"), 10, Whole),
            (Some("bytes=0-1,3-4"), 10, Whole),
            (Some("items=0-4"), 10, Whole),
            (Some("bytes=a-b"), 10, Whole),
            (Some("bytes=-"), 10, Whole),
            (Some("bytes=+1-2"), 10, Whole),
            (Some("bytes=99999999999999999999999-"), 10, Whole),
            (Some("bytes=0-99999999999999999999999"), 10, Whole),
        ];
        for (header, size, want) in cases {
            assert_eq!(parse_range(*header, *size), *want, "{header:?} of {size}");
        }
    }
}
