//! `X-Request-Id`: every request reaches its instance with one, and its response carries it
//! back. A client's own id is kept when it is well-formed (1 to [`MAX_LEN`] visible ASCII
//! characters, one header line); any other is replaced by a new one.
//!
//! A new id is 32 hex digits (128 bits): this thread's random 64-bit prefix, then its request
//! counter passed through a bijective mix with a random key of the thread (so ids are unique
//! per thread for 2^64 requests, unique across threads and processes by their random
//! prefixes, and do not tell a client how many requests the router has served). No lock, no
//! atomic shared with another thread, no system call after a thread's first id.

use std::cell::Cell;
use std::hash::BuildHasher;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

/// The header.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client id kept.
pub(crate) const MAX_LEN: usize = 128;

/// The request's id: the client's when well-formed, else a new one written in its place.
pub(crate) fn ensure(headers: &mut HeaderMap) -> HeaderValue {
    let mut lines = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(given), None) = (lines.next(), lines.next())
        && is_well_formed(given.as_bytes())
    {
        return given.clone();
    }
    let id = new_id();
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// Whether a client's id is kept: 1 to [`MAX_LEN`] visible ASCII characters.
pub(crate) fn is_well_formed(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A new id (32 lowercase hex digits).
pub(crate) fn new_id() -> HeaderValue {
    let (prefix, n) = Ids::with(Ids::next);
    let mut text = [0_u8; 32];
    hex(prefix, &mut text[..16]);
    hex(n, &mut text[16..]);
    // Hex digits are a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A uniformly distributed random `u64` from this thread's generator (for sampling).
pub(crate) fn random() -> u64 {
    Ids::with(|ids| {
        let state = ids.sample.get().wrapping_add(GOLDEN);
        ids.sample.set(state);
        mix(state)
    })
}

/// One thread's id generator.
struct Ids {
    prefix: u64,
    key: u64,
    counter: Cell<u64>,
    sample: Cell<u64>,
}

thread_local! {
    static IDS: Ids = Ids::seeded();
}

impl Ids {
    fn seeded() -> Ids {
        // std's hasher keys are random per process (from the OS) and differ per `RandomState`.
        let random = |salt: u64| std::collections::hash_map::RandomState::new().hash_one(salt);
        Ids {
            prefix: random(1),
            key: random(2),
            counter: Cell::new(0),
            sample: Cell::new(random(3)),
        }
    }

    fn with<T>(f: impl FnOnce(&Ids) -> T) -> T {
        IDS.with(f)
    }

    fn next(&self) -> (u64, u64) {
        let n = self.counter.get().wrapping_add(1);
        self.counter.set(n);
        (self.prefix, mix(n ^ self.key))
    }
}

/// SplitMix64's increment.
pub(crate) const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finalizer: a bijection on `u64` that spreads every input bit over the output.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hex(mut n: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_32_hex_digits_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = new_id();
            let text = id.to_str().unwrap().to_owned();
            assert_eq!(text.len(), 32, "{text}");
            assert!(text.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
            assert!(seen.insert(text));
        }
        // Another thread has another prefix.
        let here = new_id().to_str().unwrap()[..16].to_owned();
        let there = std::thread::spawn(|| new_id().to_str().unwrap()[..16].to_owned())
            .join()
            .unwrap();
        assert_ne!(here, there);
    }

    #[test]
    fn a_well_formed_client_id_is_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123_XYZ.=+/"));
        assert_eq!(ensure(&mut headers), "abc-123_XYZ.=+/");
        assert_eq!(headers[&X_REQUEST_ID], "abc-123_XYZ.=+/");
    }

    #[test]
    fn a_missing_or_malformed_id_is_replaced() {
        let long = "a".repeat(MAX_LEN + 1);
        let cases: Vec<Vec<&[u8]>> = vec![
            vec![],
            vec![b""],
            vec![b"has space"],
            vec![long.as_bytes()],
            vec![b"caf\xc3\xa9"],
            vec![b"one", b"two"],
        ];
        for lines in cases {
            let mut headers = HeaderMap::new();
            for line in &lines {
                headers.append(&X_REQUEST_ID, HeaderValue::from_bytes(line).unwrap());
            }
            let id = ensure(&mut headers);
            assert_eq!(id.len(), 32, "{lines:?}");
            let sent: Vec<_> = headers.get_all(&X_REQUEST_ID).iter().collect();
            assert_eq!(sent, vec![&id], "{lines:?}");
        }
        assert!(is_well_formed("a".repeat(MAX_LEN).as_bytes()));
    }

    #[test]
    fn the_mix_is_a_bijection_on_small_ranges() {
        let outputs: std::collections::HashSet<u64> = (0..100_000).map(mix).collect();
        assert_eq!(outputs.len(), 100_000);
    }
}
