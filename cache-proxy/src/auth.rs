//! Request authentication: picks presigned-query or header `SigV4`, checks time, signature and key scope.

use std::time::SystemTime;

use axum::http::HeaderMap;

use crate::chunked::ChunkSigner;
use crate::config::AccessKey;
use crate::sigv4::{self, AuthError, CanonicalInput, Credential};

/// How the request body is framed and protected, from `x-amz-content-sha256`.
#[derive(Debug, Clone)]
pub enum PayloadMode {
    Unsigned,
    /// Hex SHA-256 the body must match.
    Sha256(String),
    /// aws-chunked; `signer` is `None` for `STREAMING-UNSIGNED-PAYLOAD-TRAILER`.
    Chunked {
        signer: Option<ChunkSigner>,
        signed_trailer: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Authenticated {
    pub access_key: String,
    pub payload: PayloadMode,
    /// The presigned URL's signature, used to pin a manifest version across ranged GETs of one URL.
    pub presigned_signature: Option<String>,
}

/// What the request looks like, already parsed by the HTTP layer.
#[derive(Debug)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    pub path: &'a [u8],
    pub query: &'a [(String, String)],
    pub headers: &'a HeaderMap,
    pub bucket: &'a str,
    pub key: &'a str,
}

fn q<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn header_values(
    headers: &HeaderMap,
    signed: &[String],
) -> Result<Vec<(String, String)>, AuthError> {
    if !signed.iter().any(|h| h == "host") {
        return Err(AuthError::Malformed(
            "SignedHeaders must include host".into(),
        ));
    }
    signed
        .iter()
        .map(|name| {
            let values: Vec<String> = headers
                .get_all(name.as_str())
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            if values.is_empty() {
                return Err(AuthError::MissingSignedHeader(name.clone()));
            }
            Ok((name.clone(), values.join(",")))
        })
        .collect()
}

fn find_key<'k>(keys: &'k [AccessKey], id: &str) -> Result<&'k AccessKey, AuthError> {
    keys.iter()
        .find(|k| k.id == id)
        .ok_or_else(|| AuthError::UnknownAccessKey(id.to_owned()))
}

fn check_scope(cred: &Credential, region: &str, amz_date: &str) -> Result<(), AuthError> {
    if cred.region != region {
        return Err(AuthError::WrongRegion {
            got: cred.region.clone(),
            want: region.to_owned(),
        });
    }
    if cred.service != "s3" {
        return Err(AuthError::Malformed(format!(
            "credential scope service must be s3, not {:?}",
            cred.service
        )));
    }
    if !amz_date.starts_with(&cred.date) {
        return Err(AuthError::Malformed(
            "X-Amz-Date does not match the credential scope date".into(),
        ));
    }
    Ok(())
}

/// Verify the request; `keys` are the configured credentials, `region` the expected scope region.
pub fn authenticate(
    keys: &[AccessKey],
    region: &str,
    req: &RequestParts<'_>,
    now: SystemTime,
) -> Result<Authenticated, AuthError> {
    let out =
        if q(req.query, "X-Amz-Algorithm").is_some() || q(req.query, "X-Amz-Signature").is_some() {
            presigned(keys, region, req, now)?
        } else if let Some(h) = req.headers.get("authorization") {
            let h = h
                .to_str()
                .map_err(|_| AuthError::Malformed("Authorization header is not ASCII".into()))?;
            header_signed(keys, region, req, h, now)?
        } else {
            return Err(AuthError::Anonymous);
        };
    let key = find_key(keys, &out.access_key)?;
    // Bucket-level requests (list, delete of several keys, ListBuckets) check their keys, prefixes
    // and buckets against the scope themselves.
    if (!req.bucket.is_empty() && !bucket_allowed(key, req.bucket))
        || (!req.key.is_empty() && !key_allowed(key, req.bucket, req.key))
    {
        return Err(AuthError::Forbidden);
    }
    Ok(out)
}

/// May `key` use `bucket` at all?
#[must_use]
pub fn bucket_allowed(key: &AccessKey, bucket: &str) -> bool {
    key.buckets.is_empty() || key.buckets.iter().any(|b| b == bucket)
}

/// Is `object` inside `prefix` at a path-segment boundary? (`project/4` holds `project/4` and
/// `project/4/...`, never `project/42/...`; `project/4/` holds `project/4/...`.)
#[must_use]
pub fn within_prefix(object: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || object == prefix
        || (object.starts_with(prefix)
            && (prefix.ends_with('/') || object[prefix.len()..].starts_with('/')))
}

/// May `key` read or write `object` in `bucket`?
#[must_use]
pub fn key_allowed(key: &AccessKey, bucket: &str, object: &str) -> bool {
    bucket_allowed(key, bucket)
        && key
            .prefix
            .as_deref()
            .is_none_or(|p| within_prefix(object, p))
}

/// May `key` list keys starting with `prefix`? Only inside its own prefix (and every key the
/// listing returns is checked with `key_allowed` as well).
#[must_use]
pub fn listing_allowed(key: &AccessKey, bucket: &str, prefix: &str) -> bool {
    bucket_allowed(key, bucket)
        && key.prefix.as_deref().is_none_or(|p| {
            let dir = format!("{}/", p.trim_end_matches('/'));
            prefix.starts_with(&dir) || prefix == p.trim_end_matches('/') || prefix == dir
        })
}

fn presigned(
    keys: &[AccessKey],
    region: &str,
    req: &RequestParts<'_>,
    now: SystemTime,
) -> Result<Authenticated, AuthError> {
    let need = |n: &str| {
        q(req.query, n).ok_or_else(|| AuthError::Malformed(format!("presigned URL lacks {n}")))
    };
    if need("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" {
        return Err(AuthError::Malformed(
            "X-Amz-Algorithm must be AWS4-HMAC-SHA256".into(),
        ));
    }
    let cred = Credential::parse(need("X-Amz-Credential")?)?;
    let amz_date = need("X-Amz-Date")?;
    let expires: u64 = need("X-Amz-Expires")?
        .parse()
        .map_err(|_| AuthError::Malformed("X-Amz-Expires is not a number".into()))?;
    let signed: Vec<String> = need("X-Amz-SignedHeaders")?
        .split(';')
        .map(str::to_ascii_lowercase)
        .collect();
    let signature = need("X-Amz-Signature")?;
    check_scope(&cred, region, amz_date)?;
    sigv4::check_time(sigv4::parse_amz_date(amz_date)?, Some(expires), now)?;
    let key = find_key(keys, &cred.access_key)?;
    let payload_hash = q(req.query, "X-Amz-Content-Sha256").unwrap_or(sigv4::UNSIGNED_PAYLOAD);
    let canonical = sigv4::canonical_request(&CanonicalInput {
        method: req.method,
        path: req.path,
        query: req.query,
        headers: header_values(req.headers, &signed)?,
        payload_hash,
    });
    let sk = sigv4::signing_key(&key.secret, &cred);
    let want = sigv4::sign(
        &sk,
        &sigv4::string_to_sign(
            "AWS4-HMAC-SHA256",
            amz_date,
            &cred.scope(),
            &sigv4::sha256_hex(canonical.as_bytes()),
        ),
    );
    if !sigv4::signatures_equal(signature, &want) {
        return Err(AuthError::SignatureMismatch);
    }
    let payload = if payload_hash == sigv4::UNSIGNED_PAYLOAD {
        PayloadMode::Unsigned
    } else {
        PayloadMode::Sha256(payload_hash.to_ascii_lowercase())
    };
    Ok(Authenticated {
        access_key: cred.access_key,
        payload,
        presigned_signature: Some(want),
    })
}

fn header_signed(
    keys: &[AccessKey],
    region: &str,
    req: &RequestParts<'_>,
    auth: &str,
    now: SystemTime,
) -> Result<Authenticated, AuthError> {
    let parsed = sigv4::AuthHeader::parse(auth)?;
    let cred = parsed.credential;
    let hdr = |n: &str| req.headers.get(n).and_then(|v| v.to_str().ok());
    let amz_date = hdr("x-amz-date")
        .ok_or_else(|| AuthError::Malformed("x-amz-date header is required".into()))?;
    let content_sha = hdr("x-amz-content-sha256")
        .ok_or_else(|| AuthError::Malformed("x-amz-content-sha256 header is required".into()))?;
    check_scope(&cred, region, amz_date)?;
    sigv4::check_time(sigv4::parse_amz_date(amz_date)?, None, now)?;
    let key = find_key(keys, &cred.access_key)?;
    let signed: Vec<String> = parsed
        .signed_headers
        .iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let canonical = sigv4::canonical_request(&CanonicalInput {
        method: req.method,
        path: req.path,
        query: req.query,
        headers: header_values(req.headers, &signed)?,
        payload_hash: content_sha,
    });
    let sk = sigv4::signing_key(&key.secret, &cred);
    let want = sigv4::sign(
        &sk,
        &sigv4::string_to_sign(
            "AWS4-HMAC-SHA256",
            amz_date,
            &cred.scope(),
            &sigv4::sha256_hex(canonical.as_bytes()),
        ),
    );
    if !sigv4::signatures_equal(&parsed.signature, &want) {
        return Err(AuthError::SignatureMismatch);
    }
    let chunk_signer = || ChunkSigner {
        key: sk,
        amz_date: amz_date.to_owned(),
        scope: cred.scope(),
        seed_signature: want.clone(),
    };
    let payload = match content_sha {
        sigv4::UNSIGNED_PAYLOAD => PayloadMode::Unsigned,
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD" => PayloadMode::Chunked {
            signer: Some(chunk_signer()),
            signed_trailer: false,
        },
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER" => PayloadMode::Chunked {
            signer: Some(chunk_signer()),
            signed_trailer: true,
        },
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER" => PayloadMode::Chunked {
            signer: None,
            signed_trailer: false,
        },
        h if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            PayloadMode::Sha256(h.to_ascii_lowercase())
        }
        other => {
            return Err(AuthError::Malformed(format!(
                "unsupported x-amz-content-sha256 {other:?}"
            )));
        }
    };
    Ok(Authenticated {
        access_key: cred.access_key.clone(),
        payload,
        presigned_signature: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_end_at_path_segments() {
        let k = |bucket: Option<&str>, prefix: Option<&str>| AccessKey {
            id: "id".into(),
            secret: "s".into(),
            buckets: bucket.map(str::to_owned).into_iter().collect(),
            prefix: prefix.map(str::to_owned),
        };
        let p4 = k(Some("b"), Some("project/4"));
        assert!(key_allowed(&p4, "b", "project/4"));
        assert!(key_allowed(&p4, "b", "project/4/cache.zip"));
        assert!(!key_allowed(&p4, "b", "project/42/cache.zip"));
        assert!(!key_allowed(&p4, "other", "project/4/cache.zip"));
        let p4s = k(None, Some("project/4/"));
        assert!(key_allowed(&p4s, "any", "project/4/x"));
        assert!(!key_allowed(&p4s, "any", "project/40"));
        assert!(listing_allowed(&p4, "b", "project/4/"));
        assert!(listing_allowed(&p4, "b", "project/4/sub"));
        assert!(!listing_allowed(&p4, "b", "project/"));
        assert!(!listing_allowed(&p4, "b", ""));
        assert!(listing_allowed(&k(None, None), "b", ""));
    }
}
