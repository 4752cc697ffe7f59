//! AWS Signature Version 4 verification: presigned query URLs and `Authorization` headers (pure).
//!
//! The canonical request covers every query parameter except `X-Amz-Signature` (no fixed list), because
//! minio-go, aws-sdk-go-v2 and the smithy SDKs add different extra parameters (reference/cache.md §1.5).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The literal payload hash used by presigned URLs and unsigned bodies.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// The longest validity a presigned URL may claim (7 days, the AWS maximum).
pub const MAX_EXPIRES_SECS: u64 = 604_800;
/// Allowed clock skew between signer and proxy.
pub const MAX_SKEW: Duration = Duration::from_mins(15);
/// SHA-256 of the empty string, used in chunk signatures.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Why a request's signature was not accepted; each maps to one S3 error code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("{0}")]
    Malformed(String),
    /// Displays only the id's last characters: this error is logged, and ids stay out of logs.
    #[error("the access key id {} is not known", access_key_hint(.0))]
    UnknownAccessKey(String),
    #[error("Request has expired")]
    Expired,
    #[error("X-Amz-Date is too far in the future (clock skew over 15 minutes)")]
    TooEarly,
    #[error("X-Amz-Expires must be at most 604800 seconds")]
    ExpiresTooLong,
    #[error("credential scope region {got:?} does not match {want:?}")]
    WrongRegion { got: String, want: String },
    #[error("signed header {0:?} is missing from the request")]
    MissingSignedHeader(String),
    #[error("The request signature we calculated does not match the signature you provided")]
    SignatureMismatch,
    #[error("access key is not allowed to access this bucket or key")]
    Forbidden,
    #[error("anonymous requests are not allowed; sign with SigV4")]
    Anonymous,
}

/// `…` plus the last four characters of an access key id: enough to tell configured keys apart in
/// logs without writing the id itself there (ids of four characters or fewer show as `…` alone).
#[must_use]
pub fn access_key_hint(id: &str) -> String {
    let n = id.chars().count();
    if n <= 4 {
        return "…".to_owned();
    }
    let tail: String = id.chars().skip(n - 4).collect();
    format!("…{tail}")
}

/// Parsed `<AK>/<yyyymmdd>/<region>/s3/aws4_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub access_key: String,
    pub date: String,
    pub region: String,
    pub service: String,
}

impl Credential {
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() != 5 || parts[4] != "aws4_request" || parts[1].len() != 8 {
            // The value is not echoed: it starts with an access key id, and this message is logged.
            return Err(AuthError::Malformed(
                "malformed credential: expected <access key id>/<yyyymmdd>/<region>/s3/aws4_request"
                    .into(),
            ));
        }
        Ok(Self {
            access_key: parts[0].to_owned(),
            date: parts[1].to_owned(),
            region: parts[2].to_owned(),
            service: parts[3].to_owned(),
        })
    }

    #[must_use]
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// URI-encode per `SigV4`: everything except unreserved characters, optionally keeping `/`.
#[must_use]
pub fn uri_encode(input: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(input.len());
    for &b in input {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Percent-decode (no `+` → space: S3 paths and `SigV4` queries treat `+` literally only when encoded).
pub fn percent_decode(input: &str) -> Result<Vec<u8>, AuthError> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                // The position, not the input: a query value can be a credential or a token.
                .ok_or_else(|| AuthError::Malformed(format!("bad percent-encoding at byte {i}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Split a raw query string into decoded (name, value) pairs, in order.
pub fn parse_query(raw: &str) -> Result<Vec<(String, String)>, AuthError> {
    let mut out = Vec::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let k = String::from_utf8(percent_decode(k)?)
            .map_err(|_| AuthError::Malformed("query name is not UTF-8".into()))?;
        let v = String::from_utf8(percent_decode(v)?)
            .map_err(|_| AuthError::Malformed("query value is not UTF-8".into()))?;
        out.push((k, v));
    }
    Ok(out)
}

/// Canonical query: every pair except `X-Amz-Signature`, encoded, sorted by name then value.
#[must_use]
pub fn canonical_query(pairs: &[(String, String)]) -> String {
    let mut enc: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| {
            (
                uri_encode(k.as_bytes(), false),
                uri_encode(v.as_bytes(), false),
            )
        })
        .collect();
    enc.sort();
    enc.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Header value canonical form: trimmed, inner whitespace runs collapsed to one space.
#[must_use]
pub fn canonical_header_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Everything the canonical request needs, extracted from the HTTP request by the caller.
#[derive(Debug)]
pub struct CanonicalInput<'a> {
    pub method: &'a str,
    /// Decoded path, e.g. `/bucket/dir/key`; encoded here once, S3 style (no normalisation).
    pub path: &'a [u8],
    pub query: &'a [(String, String)],
    /// (lowercase name, value) for each signed header, in signed-header order.
    pub headers: Vec<(String, String)>,
    pub payload_hash: &'a str,
}

#[must_use]
pub fn canonical_request(input: &CanonicalInput<'_>) -> String {
    let mut headers = input.headers.clone();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let mut s = String::new();
    s.push_str(input.method);
    s.push('\n');
    s.push_str(&uri_encode(input.path, true));
    s.push('\n');
    s.push_str(&canonical_query(input.query));
    s.push('\n');
    for (k, v) in &headers {
        let _ = writeln!(s, "{k}:{}", canonical_header_value(v));
    }
    s.push('\n');
    s.push_str(
        &headers
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";"),
    );
    s.push('\n');
    s.push_str(input.payload_hash);
    s
}

#[must_use]
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The derived key `"AWS4"+secret → date → region → service → "aws4_request"`.
#[must_use]
pub fn signing_key(secret: &str, cred: &Credential) -> [u8; 32] {
    let k = hmac(format!("AWS4{secret}").as_bytes(), cred.date.as_bytes());
    let k = hmac(&k, cred.region.as_bytes());
    let k = hmac(&k, cred.service.as_bytes());
    hmac(&k, b"aws4_request")
}

#[must_use]
pub fn string_to_sign(algorithm: &str, amz_date: &str, scope: &str, hashed: &str) -> String {
    format!("{algorithm}\n{amz_date}\n{scope}\n{hashed}")
}

#[must_use]
pub fn sign(key: &[u8; 32], string_to_sign: &str) -> String {
    hex::encode(hmac(key, string_to_sign.as_bytes()))
}

/// Constant-time comparison of two hex signatures.
#[must_use]
pub fn signatures_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Signature of one aws-chunked chunk, chained to the previous signature.
#[must_use]
pub fn chunk_signature(
    key: &[u8; 32],
    amz_date: &str,
    scope: &str,
    prev: &str,
    data_sha256_hex: &str,
) -> String {
    let sts = format!(
        "AWS4-HMAC-SHA256-PAYLOAD\n{amz_date}\n{scope}\n{prev}\n{EMPTY_SHA256}\n{data_sha256_hex}"
    );
    sign(key, &sts)
}

/// Signature of the trailing headers, chained to the final chunk's signature.
#[must_use]
pub fn trailer_signature(
    key: &[u8; 32],
    amz_date: &str,
    scope: &str,
    prev: &str,
    trailers: &[(String, String)],
) -> String {
    let mut sorted: Vec<(String, String)> = trailers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    sorted.sort();
    let mut canon = String::new();
    for (k, v) in &sorted {
        let _ = writeln!(canon, "{k}:{v}");
    }
    let sts = format!(
        "AWS4-HMAC-SHA256-TRAILER\n{amz_date}\n{scope}\n{prev}\n{}",
        sha256_hex(canon.as_bytes())
    );
    sign(key, &sts)
}

/// Parse `yyyymmddTHHMMSSZ` into a time.
pub fn parse_amz_date(s: &str) -> Result<SystemTime, AuthError> {
    let bad = || AuthError::Malformed(format!("X-Amz-Date {s:?} is not yyyymmddTHHMMSSZ"));
    // ASCII first: slicing at fixed byte offsets would panic inside a multi-byte character (found by
    // the sigv4 fuzz target: a percent-decoded presigned X-Amz-Date reaches here unchecked).
    if s.len() != 16 || !s.is_ascii() || &s[8..9] != "T" || !s.ends_with('Z') {
        return Err(bad());
    }
    let num =
        |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<u64>().ok()).ok_or_else(bad);
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 || y < 1970
    {
        return Err(bad());
    }
    let days = days_from_civil(y, mo, d);
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(days * 86_400 + h * 3600 + mi * 60 + se))
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm), for dates ≥ 1970.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Check `X-Amz-Date`/`X-Amz-Expires` against `now`.
pub fn check_time(
    amz_date: SystemTime,
    expires: Option<u64>,
    now: SystemTime,
) -> Result<(), AuthError> {
    if amz_date > now + MAX_SKEW {
        return Err(AuthError::TooEarly);
    }
    match expires {
        Some(e) => {
            if e > MAX_EXPIRES_SECS {
                return Err(AuthError::ExpiresTooLong);
            }
            if now > amz_date + Duration::from_secs(e) {
                return Err(AuthError::Expired);
            }
        }
        // Header auth: the request itself must be recent.
        None => {
            if now > amz_date + MAX_SKEW {
                return Err(AuthError::Expired);
            }
        }
    }
    Ok(())
}

/// Parsed `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`.
#[derive(Debug, Clone)]
pub struct AuthHeader {
    pub credential: Credential,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

impl AuthHeader {
    pub fn parse(v: &str) -> Result<Self, AuthError> {
        let rest = v.strip_prefix("AWS4-HMAC-SHA256").ok_or_else(|| {
            AuthError::Malformed("only AWS4-HMAC-SHA256 authorization is supported".into())
        })?;
        let mut fields = BTreeMap::new();
        for part in rest.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                fields.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        let get = |k: &str| {
            fields
                .get(k)
                .cloned()
                .ok_or_else(|| AuthError::Malformed(format!("Authorization header lacks {k}")))
        };
        Ok(Self {
            credential: Credential::parse(&get("Credential")?)?,
            signed_headers: get("SignedHeaders")?
                .split(';')
                .map(str::to_owned)
                .collect(),
            signature: get("Signature")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 16): a failed authentication logged the whole access key id.
    #[test]
    fn auth_errors_show_no_access_key_id() {
        let id = "AKIAIOSFODNN7EXAMPLE";
        let shown = AuthError::UnknownAccessKey(id.into()).to_string();
        assert_eq!(shown, "the access key id …MPLE is not known");
        let shown = Credential::parse(&format!("{id}/20130524/us-east-1/s3"))
            .unwrap_err()
            .to_string();
        assert!(!shown.contains("AKIA"), "{shown}");
        let shown = percent_decode(&format!("{id}%2")).unwrap_err().to_string();
        assert!(!shown.contains("AKIA"), "{shown}");
        assert_eq!(access_key_hint("runner-key"), "…-key");
        assert_eq!(access_key_hint("abcd"), "…");
        assert_eq!(access_key_hint("ключ-доступа"), "…тупа");
    }

    #[test]
    fn amz_date_with_multibyte_characters_is_malformed_not_a_panic() {
        // Regression: 16 bytes, but byte 8 falls inside a character.
        let s = "`\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}";
        assert_eq!(s.len(), 16);
        assert!(matches!(parse_amz_date(s), Err(AuthError::Malformed(_))));
    }

    /// The GET example from the S3 `SigV4` documentation ("Example: GET Object").
    #[test]
    fn aws_documented_get_object_example() {
        let cred =
            Credential::parse("AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request").unwrap();
        let input = CanonicalInput {
            method: "GET",
            path: b"/test.txt",
            query: &[],
            headers: vec![
                ("host".into(), "examplebucket.s3.amazonaws.com".into()),
                ("range".into(), "bytes=0-9".into()),
                ("x-amz-content-sha256".into(), EMPTY_SHA256.into()),
                ("x-amz-date".into(), "20130524T000000Z".into()),
            ],
            payload_hash: EMPTY_SHA256,
        };
        let canonical = canonical_request(&input);
        assert_eq!(
            canonical,
            "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\nx-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\nx-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let sts = string_to_sign(
            "AWS4-HMAC-SHA256",
            "20130524T000000Z",
            &cred.scope(),
            &sha256_hex(canonical.as_bytes()),
        );
        let key = signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", &cred);
        assert_eq!(
            sign(&key, &sts),
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// The presigned URL example from the S3 documentation ("Query string authentication").
    #[test]
    fn aws_documented_presigned_example() {
        let query = parse_query(
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host",
        )
        .unwrap();
        let input = CanonicalInput {
            method: "GET",
            path: b"/test.txt",
            query: &query,
            headers: vec![("host".into(), "examplebucket.s3.amazonaws.com".into())],
            payload_hash: UNSIGNED_PAYLOAD,
        };
        let canonical = canonical_request(&input);
        let cred =
            Credential::parse("AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request").unwrap();
        let sts = string_to_sign(
            "AWS4-HMAC-SHA256",
            "20130524T000000Z",
            &cred.scope(),
            &sha256_hex(canonical.as_bytes()),
        );
        let key = signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", &cred);
        assert_eq!(
            sign(&key, &sts),
            "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    #[test]
    fn encodes_like_sigv4() {
        assert_eq!(uri_encode(b"a b/c~d+e=f", true), "a%20b/c~d%2Be%3Df");
        assert_eq!(uri_encode(b"a/b", false), "a%2Fb");
        assert_eq!(
            canonical_query(&[
                ("b".into(), "2".into()),
                ("X-Amz-Signature".into(), "x".into()),
                ("a".into(), "1 2".into())
            ]),
            "a=1%202&b=2"
        );
    }

    #[test]
    fn parses_dates_and_checks_expiry() {
        let t = parse_amz_date("20130524T000000Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_369_353_600
        );
        assert!(parse_amz_date("20130524 000000Z").is_err());
        assert_eq!(
            check_time(t, Some(10), t + Duration::from_secs(11)),
            Err(AuthError::Expired)
        );
        assert_eq!(check_time(t, Some(10), t + Duration::from_secs(10)), Ok(()));
        assert_eq!(
            check_time(t, Some(604_801), t),
            Err(AuthError::ExpiresTooLong)
        );
        assert_eq!(
            check_time(t + Duration::from_secs(901), Some(10), t),
            Err(AuthError::TooEarly)
        );
    }

    /// Chunk signature example from the S3 "sigv4-streaming" documentation (first 64 KiB chunk of 'a').
    #[test]
    fn aws_documented_chunk_signature() {
        let cred =
            Credential::parse("AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request").unwrap();
        let key = signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", &cred);
        let data = vec![b'a'; 65_536];
        let sig = chunk_signature(
            &key,
            "20130524T000000Z",
            &cred.scope(),
            "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
            &sha256_hex(&data),
        );
        assert_eq!(
            sig,
            "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"
        );
    }

    #[test]
    fn parses_authorization_header() {
        let h = AuthHeader::parse("AWS4-HMAC-SHA256 Credential=AK/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc").unwrap();
        assert_eq!(h.credential.access_key, "AK");
        assert_eq!(h.signed_headers, vec!["host", "x-amz-date"]);
        assert_eq!(h.signature, "abc");
        assert!(AuthHeader::parse("AWS abc").is_err());
    }
}
