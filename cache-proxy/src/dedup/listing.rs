//! Key-ordered listing entries. Manifests are named by a hash of their key (spread over prefixes,
//! any key length), so `ListObjects` reads a second, ordered name space: one empty object per key,
//! `keys/<bucket>/<name(key)>!<size>!<mtime>!<etag>`, written right after the manifest.
//!
//! `name(key)` is an order-preserving encoding: base64 over a sorted alphabet, without padding (the
//! last group's spare bits are zero), with a `/` before every `SEGMENT`th character so that no path
//! segment of the disk store exceeds file-name limits. Byte order of keys equals string order of
//! names, and a `!` (below every alphabet character and `/`) ends each name, so keys sharing a
//! prefix are contiguous and a key sorts before its extensions. The backend's own sorted listing
//! with `start-after` then gives prefix, marker and delimiter listings without reading manifests.
//!
//! Entries carry size, mtime and `ETag`, so a listing page costs one backend list. A crash or a race
//! between two writers of one key can leave a stale entry beside the current one: readers resolve
//! duplicates against the manifest, and GC rewrites entries from the manifests it reads anyway.

/// The sorted base64 alphabet (ASCII order).
const ALPHABET: &[u8; 64] = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";
/// Characters per path segment of an entry name.
const SEGMENT: usize = 200;
/// Longest key that fits in an entry name within S3 and GCS object-name limits (1,024 bytes):
/// 4/3 expansion plus separators, the bucket and the size/time/`ETag` suffix.
pub const LISTABLE_KEY_MAX: usize = 700;
/// Sorts after every character an entry name can hold at a position (alphabet, `/`, `!`).
const AFTER_ALL: char = '~';

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListingError {
    #[error("listing entry {0:?} is malformed")]
    Malformed(String),
}

/// One key as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub size: u64,
    /// Unix seconds.
    pub mtime: u64,
    /// Quoted, as returned on GET.
    pub etag: String,
}

#[must_use]
pub fn bucket_prefix(bucket: &str) -> String {
    format!("keys/{bucket}/")
}

/// Sorted base64 of `bits`; with `fill_ones`, the last group's spare bits are ones instead of
/// zeros (the largest name any extension of these bytes can start with).
fn encode(bytes: &[u8], fill_ones: bool) -> String {
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 2);
    for group in bytes.chunks(3) {
        let mut v = 0u32;
        for (i, b) in group.iter().enumerate() {
            v |= u32::from(*b) << (16 - 8 * i);
        }
        let chars = match group.len() {
            1 => 2,
            2 => 3,
            _ => 4,
        };
        if fill_ones && group.len() < 3 {
            v |= (1u32 << (24 - 8 * group.len())) - 1;
        }
        for i in 0..chars {
            out.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[allow(clippy::cast_possible_truncation)] // 6-bit digits and 8-bit bytes of a 24-bit group
fn decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for group in s.as_bytes().chunks(4) {
        if group.len() == 1 {
            return None;
        }
        let mut v = 0u32;
        for (i, c) in group.iter().enumerate() {
            let d = ALPHABET.iter().position(|a| a == c)?;
            v |= (d as u32) << (18 - 6 * i);
        }
        let n = group.len() - 1;
        for i in 0..n {
            out.push((v >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// A `/` before every `SEGMENT`th character (never at the end: names then continue with `!`).
fn with_slashes(enc: &str) -> String {
    let mut out = String::with_capacity(enc.len() + enc.len() / SEGMENT + 1);
    for (i, c) in enc.chars().enumerate() {
        if i > 0 && i % SEGMENT == 0 {
            out.push('/');
        }
        out.push(c);
    }
    out
}

/// The backend name of a key's entry.
#[must_use]
pub fn entry_name(bucket: &str, e: &Entry) -> String {
    format!(
        "{}{}!{}!{}!{}",
        bucket_prefix(bucket),
        with_slashes(&encode(e.key.as_bytes(), false)),
        e.size,
        e.mtime,
        e.etag.trim_matches('"')
    )
}

/// The backend prefix all entries of `key` (current and stale) start with.
#[must_use]
pub fn key_entries_prefix(bucket: &str, key: &str) -> String {
    format!(
        "{}{}!",
        bucket_prefix(bucket),
        with_slashes(&encode(key.as_bytes(), false))
    )
}

/// Parse a backend name (with its `keys/<bucket>/` prefix).
pub fn parse_entry(bucket: &str, name: &str) -> Result<Entry, ListingError> {
    let bad = || ListingError::Malformed(name.to_owned());
    let rest = name.strip_prefix(&bucket_prefix(bucket)).ok_or_else(bad)?;
    let (enc, tail) = rest.split_once('!').ok_or_else(bad)?;
    let key =
        String::from_utf8(decode(&enc.replace('/', "")).ok_or_else(bad)?).map_err(|_| bad())?;
    let mut parts = tail.splitn(3, '!');
    let size = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let mtime = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let etag = parts.next().filter(|e| !e.is_empty()).ok_or_else(bad)?;
    Ok(Entry {
        key,
        size,
        mtime,
        etag: format!("\"{etag}\""),
    })
}

/// Where a listing of keys starting with `prefix` reads: the backend prefix (whole 3-byte groups
/// of the key prefix) and the exclusive start (`start-after`) below every name of a key ≥ `prefix`.
#[must_use]
pub fn scan_for_prefix(bucket: &str, prefix: &str) -> (String, String) {
    let whole = prefix.len() / 3 * 3;
    let backend = format!(
        "{}{}",
        bucket_prefix(bucket),
        with_slashes(&encode(&prefix.as_bytes()[..whole], false))
    );
    let start = format!(
        "{}{}",
        bucket_prefix(bucket),
        with_slashes(&encode(prefix.as_bytes(), false))
    );
    (backend, start)
}

/// A `start-after` that skips `key` itself (and only it).
#[must_use]
pub fn after_key(bucket: &str, key: &str) -> String {
    format!("{}{AFTER_ALL}", key_entries_prefix(bucket, key))
}

/// A `start-after` that skips every key starting with `prefix` (a common prefix already returned).
#[must_use]
pub fn after_prefix(bucket: &str, prefix: &str) -> String {
    format!(
        "{}{}{AFTER_ALL}",
        bucket_prefix(bucket),
        with_slashes(&encode(prefix.as_bytes(), true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> Entry {
        Entry {
            key: key.to_owned(),
            size: 7,
            mtime: 1_700_000_000,
            etag: "\"d41d8cd98f00b204e9800998ecf8427e-3\"".to_owned(),
        }
    }

    fn keys() -> Vec<String> {
        let mut ks: Vec<String> = vec![
            "",
            "a",
            "a/",
            "a/b",
            "a/b/c",
            "a0",
            "a\u{1}",
            "ab",
            "abc",
            "abcd",
            "b",
            "z",
            "~",
            "é",
            "日本",
            "tmp/uploads/1",
            "tmp/uploads/10",
            "tmp/uploads/2",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        // Long keys cross segment boundaries; some share their first segment exactly.
        for n in [148usize, 149, 150, 151, 152, 300, 301, 302, 700] {
            ks.push(format!(
                "{}{}",
                "k".repeat(n.min(150)),
                "x".repeat(n.saturating_sub(150))
            ));
        }
        ks.push(format!("{}\u{0}", "k".repeat(150)));
        ks.sort();
        ks.dedup();
        ks
    }

    #[test]
    fn names_sort_like_keys_and_round_trip() {
        let ks = keys();
        let names: Vec<String> = ks.iter().map(|k| entry_name("b", &entry(k))).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "entry names must sort in key order");
        for (k, n) in ks.iter().zip(&names) {
            assert_eq!(parse_entry("b", n).unwrap(), entry(k), "{n}");
            assert!(n.split('/').all(|seg| !seg.is_empty() && seg.len() <= 255));
        }
        assert!(entry_name("b", &entry(&"x".repeat(LISTABLE_KEY_MAX))).len() <= 1024);
    }

    #[test]
    fn random_keys_keep_order() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut ks: Vec<Vec<u8>> = (0..3000)
            .map(|_| {
                let len = (next() % 420) as usize;
                (0..len)
                    .map(|_| b"ab/\x00\xff"[(next() % 5) as usize])
                    .collect()
            })
            .collect();
        ks.sort();
        let names: Vec<String> = ks
            .iter()
            .map(|k| format!("{}!", with_slashes(&encode(k, false))))
            .collect();
        for (w, k) in names.windows(2).zip(ks.windows(2)) {
            assert!(w[0] <= w[1], "{:?} vs {:?}", k[0], k[1]);
            assert_eq!(w[0] == w[1], k[0] == k[1]);
        }
        for (k, n) in ks.iter().zip(&names) {
            assert_eq!(
                &decode(&n.trim_end_matches('!').replace('/', "")).unwrap(),
                k
            );
        }
    }

    #[test]
    fn prefix_scans_cover_exactly_the_prefixed_keys() {
        let ks = keys();
        for p in [
            "",
            "a",
            "a/",
            "ab",
            "abc",
            "tmp/uploads/1",
            "k",
            "kkkk",
            "é",
        ] {
            let (backend, start) = scan_for_prefix("b", p);
            let got: Vec<&String> = ks
                .iter()
                .filter(|k| {
                    let n = entry_name("b", &entry(k));
                    n.starts_with(&backend) && n > start
                })
                .filter(|k| k.starts_with(p))
                .collect();
            let want: Vec<&String> = ks.iter().filter(|k| k.starts_with(p)).collect();
            assert_eq!(got, want, "prefix {p:?}");
            // Nothing below the start is a key ≥ the prefix.
            for k in &ks {
                if k.as_str() >= p {
                    assert!(
                        entry_name("b", &entry(k)) > start,
                        "{k:?} under start of {p:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn skips_are_exact() {
        let ks = keys();
        for m in &ks {
            let after = after_key("b", m);
            for k in &ks {
                assert_eq!(
                    entry_name("b", &entry(k)) > after,
                    k > m,
                    "after {m:?}: {k:?}"
                );
            }
        }
        for p in ["a/", "a", "tmp/uploads/", "k", "kk", "kkk", "é"] {
            let after = after_prefix("b", p);
            for k in &ks {
                let beyond = !k.starts_with(p) && k.as_str() > p;
                assert_eq!(
                    entry_name("b", &entry(k)) > after,
                    beyond,
                    "after prefix {p:?}: {k:?}"
                );
            }
        }
    }

    #[test]
    fn malformed_entries_are_named() {
        for bad in [
            "keys/b/",
            "keys/b/YW!1!2",
            "keys/b/Y!1!2!e",
            "keys/b/YW!x!2!e",
            "keys/b/Y*!1!2!e",
            "keys/c/YW!1!2!e",
        ] {
            assert_eq!(
                parse_entry("b", bad),
                Err(ListingError::Malformed(bad.to_owned()))
            );
        }
    }
}
