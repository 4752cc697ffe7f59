//! The S3 operations beyond GET/HEAD/PUT of one object: listings, deletes, copies, multipart
//! uploads and conditional requests. Each handler maps one S3 operation onto the dedup store;
//! request parsing, authentication and dispatch stay in `server`.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;

use crate::auth::{self, PayloadMode};
use crate::config::AccessKey;
use crate::dedup::keys::{ListQuery, Listed, Resume};
use crate::dedup::manifest::{Manifest, ObjectHeader};
use crate::dedup::multipart::{self, MultipartError, UploadMeta};
use crate::dedup::{NewObject, listing};
use crate::s3error::{S3Error, xml_escape};
use crate::server::{
    AppState, dedup_error, header_str, receive_body, stored_attrs, user_metadata, validate_key,
};

/// Largest XML request body (`CompleteMultipartUpload` with 10,000 parts, `DeleteObjects` with
/// 1,000 keys).
const XML_BODY_MAX: usize = 2 << 20;
/// S3's page limits.
const MAX_KEYS: usize = 1000;
const MAX_DELETE: usize = 1000;
const XMLNS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";

fn q<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn xml_response(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/xml")],
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{body}"),
    )
        .into_response()
}

/// S3's timestamp format (`2026-12-02T07:03:14.000Z`).
fn iso8601(secs: u64) -> String {
    use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
    let t = DateTime::from_secs(i64::try_from(secs).unwrap_or(i64::MAX));
    t.fmt(DateTimeFormat::DateTime).map_or_else(
        |_| "1970-01-01T00:00:00.000Z".to_owned(),
        |s| s.replace('Z', ".000Z"),
    )
}

async fn read_xml_body(body: Body) -> Result<Vec<u8>, S3Error> {
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(frame) = stream.next().await {
        let frame = frame
            .map_err(|_| S3Error::bad_request("IncompleteBody", "the request body ended early"))?;
        if out.len() + frame.len() > XML_BODY_MAX {
            return Err(S3Error::bad_request(
                "MalformedXML",
                "the XML request body is larger than 2 MiB",
            ));
        }
        out.extend_from_slice(&frame);
    }
    Ok(out)
}

fn malformed_xml(e: impl std::fmt::Display) -> S3Error {
    S3Error::bad_request(
        "MalformedXML",
        format!(
            "The XML you provided was not well-formed or did not validate against our published schema: {e}"
        ),
    )
}

fn no_such_key() -> S3Error {
    S3Error::new(
        StatusCode::NOT_FOUND,
        "NoSuchKey",
        "The specified key does not exist.",
    )
}

fn precondition_failed() -> S3Error {
    S3Error::new(
        StatusCode::PRECONDITION_FAILED,
        "PreconditionFailed",
        "At least one of the pre-conditions you specified did not hold",
    )
}

fn scope_denied() -> S3Error {
    S3Error::access_denied("Access Denied: outside this access key's bucket or key prefix")
}

// ---------------------------------------------------------------------------------------------
// Conditional requests (RFC 9110 §13 as S3 applies them).

fn etag_matches(list: &str, etag: &str) -> bool {
    let etag = etag.trim_matches('"');
    list.split(',')
        .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|t| t == "*" || t == etag)
}

fn http_date(v: &str) -> Option<u64> {
    httpdate::parse_http_date(v.trim())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

/// What a GET or HEAD's conditions decide: serve, 304, or 412.
pub(crate) fn read_conditions(headers: &HeaderMap, h: &ObjectHeader) -> Result<(), S3Error> {
    conditions(headers, h, "")
}

/// `prefix` is `""` for the request's own headers, `"x-amz-copy-source-"` for a copy's source.
fn conditions(headers: &HeaderMap, h: &ObjectHeader, prefix: &str) -> Result<(), S3Error> {
    let get = |name: &str| header_str(headers, &format!("{prefix}{name}"));
    let if_match = get("if-match");
    if let Some(list) = if_match
        && !etag_matches(list, &h.etag)
    {
        return Err(precondition_failed());
    }
    if if_match.is_none()
        && let Some(t) = get("if-unmodified-since").and_then(http_date)
        && h.last_modified > t
    {
        return Err(precondition_failed());
    }
    let if_none = get("if-none-match");
    if let Some(list) = if_none
        && etag_matches(list, &h.etag)
    {
        return Err(not_modified(prefix));
    }
    if if_none.is_none()
        && let Some(t) = get("if-modified-since").and_then(http_date)
        && h.last_modified <= t
    {
        return Err(not_modified(prefix));
    }
    Ok(())
}

fn not_modified(prefix: &str) -> S3Error {
    if prefix.is_empty() {
        S3Error::new(StatusCode::NOT_MODIFIED, "NotModified", "Not Modified")
    } else {
        precondition_failed() // a copy's source conditions answer 412 either way
    }
}

/// PUT's conditions: `If-None-Match: *` (create only) and `If-Match` (replace that version only).
pub(crate) async fn check_put_conditions(
    st: &AppState,
    bucket: &str,
    key: &str,
    headers: &HeaderMap,
) -> Result<(), S3Error> {
    let if_none = header_str(headers, "if-none-match");
    let if_match = header_str(headers, "if-match");
    if if_none.is_none() && if_match.is_none() {
        return Ok(());
    }
    let current = st
        .dedup
        .manifest(bucket, key)
        .await
        .map_err(|e| dedup_error(&e))?;
    if let Some(v) = if_none {
        if v.trim() != "*" {
            return Err(S3Error::not_implemented(
                "If-None-Match other than * on PUT",
            ));
        }
        if current.is_some() {
            return Err(precondition_failed());
        }
    }
    if let Some(list) = if_match {
        match current {
            Some(m) if etag_matches(list, &m.header.etag) => {}
            Some(_) => return Err(precondition_failed()),
            None => return Err(no_such_key()),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Listings.

fn encode_key(s: &str, url: bool) -> String {
    if url {
        crate::sigv4::uri_encode(s.as_bytes(), true)
    } else {
        xml_escape(s)
    }
}

fn max_keys(query: &[(String, String)], name: &str) -> Result<usize, S3Error> {
    match q(query, name) {
        None => Ok(MAX_KEYS),
        Some(v) => v.parse::<usize>().map(|n| n.min(MAX_KEYS)).map_err(|_| {
            S3Error::bad_request("InvalidArgument", format!("{name} is not a number"))
        }),
    }
}

fn encoding_url(query: &[(String, String)]) -> Result<bool, S3Error> {
    match q(query, "encoding-type") {
        None => Ok(false),
        Some("url") => Ok(true),
        Some(_) => Err(S3Error::bad_request(
            "InvalidArgument",
            "Invalid Encoding Method specified in Request",
        )),
    }
}

/// `ListObjects` (V1) and `ListObjectsV2`.
pub(crate) async fn list_objects(
    st: &AppState,
    ak: &AccessKey,
    bucket: &str,
    query: &[(String, String)],
    v2: bool,
) -> Result<Response, S3Error> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let prefix = q(query, "prefix").unwrap_or("").to_owned();
    let delimiter = q(query, "delimiter")
        .filter(|d| !d.is_empty())
        .map(str::to_owned);
    let url = encoding_url(query)?;
    let max = max_keys(query, "max-keys")?;
    if !auth::listing_allowed(ak, bucket, &prefix) {
        return Err(scope_denied());
    }
    let after = if v2 {
        if let Some(tok) = q(query, "continuation-token") {
            let raw = b64
                .decode(tok)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    S3Error::bad_request(
                        "InvalidArgument",
                        "The continuation token provided is incorrect",
                    )
                })?;
            Some(match raw.split_once(':') {
                Some(("k", k)) => Resume::Key(k.to_owned()),
                Some(("p", p)) => Resume::Prefix(p.to_owned()),
                _ => {
                    return Err(S3Error::bad_request(
                        "InvalidArgument",
                        "The continuation token provided is incorrect",
                    ));
                }
            })
        } else {
            q(query, "start-after").map(|k| Resume::Key(k.to_owned()))
        }
    } else {
        q(query, "marker").map(|m| {
            // A marker that is a common prefix of this listing skips everything under it.
            match &delimiter {
                Some(d) if m.starts_with(&prefix) && m.ends_with(d.as_str()) => {
                    Resume::Prefix(m.to_owned())
                }
                _ => Resume::Key(m.to_owned()),
            }
        })
    };
    let listed: Listed = st
        .dedup
        .list_keys(
            bucket,
            &ListQuery {
                prefix: prefix.clone(),
                delimiter: delimiter.clone(),
                after,
                max_keys: max,
            },
        )
        .await
        .map_err(|e| dedup_error(&e))?;
    let mut x = format!(
        "<ListBucketResult xmlns=\"{XMLNS}\"><Name>{}</Name>",
        xml_escape(bucket)
    );
    x += &format!("<Prefix>{}</Prefix>", encode_key(&prefix, url));
    if let Some(d) = &delimiter {
        x += &format!("<Delimiter>{}</Delimiter>", encode_key(d, url));
    }
    x += &format!("<MaxKeys>{max}</MaxKeys>");
    if url {
        x += "<EncodingType>url</EncodingType>";
    }
    x += &format!("<IsTruncated>{}</IsTruncated>", listed.truncated);
    let count = listed.entries.len() + listed.common_prefixes.len();
    if v2 {
        x += &format!("<KeyCount>{count}</KeyCount>");
        for (name, v) in [
            ("ContinuationToken", q(query, "continuation-token")),
            ("StartAfter", q(query, "start-after")),
        ] {
            if let Some(v) = v {
                let v = if name == "StartAfter" {
                    encode_key(v, url)
                } else {
                    xml_escape(v)
                };
                x += &format!("<{name}>{v}</{name}>");
            }
        }
        if listed.truncated
            && let Some(last) = &listed.last
        {
            let raw = match last {
                Resume::Key(k) => format!("k:{k}"),
                Resume::Prefix(p) => format!("p:{p}"),
            };
            x += &format!(
                "<NextContinuationToken>{}</NextContinuationToken>",
                b64.encode(raw)
            );
        }
    } else {
        x += &format!(
            "<Marker>{}</Marker>",
            encode_key(q(query, "marker").unwrap_or(""), url)
        );
        if listed.truncated
            && delimiter.is_some()
            && let Some(last) = &listed.last
        {
            let (Resume::Key(m) | Resume::Prefix(m)) = last;
            x += &format!("<NextMarker>{}</NextMarker>", encode_key(m, url));
        }
    }
    for e in listed
        .entries
        .iter()
        .filter(|e| auth::key_allowed(ak, bucket, &e.key))
    {
        x += &format!(
            "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>{}</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
            encode_key(&e.key, url),
            iso8601(e.mtime / 1000),
            xml_escape(&e.etag),
            e.size
        );
    }
    for p in &listed.common_prefixes {
        x += &format!(
            "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
            encode_key(p, url)
        );
    }
    x += "</ListBucketResult>";
    Ok(xml_response(StatusCode::OK, &x))
}

/// `ListBuckets`: the configured buckets this key may use.
pub(crate) fn list_buckets(st: &AppState, ak: &AccessKey) -> Response {
    let mut x = format!(
        "<ListAllMyBucketsResult xmlns=\"{XMLNS}\"><Owner><ID>spotrun</ID><DisplayName>spotrun</DisplayName></Owner><Buckets>"
    );
    for b in st
        .settings
        .buckets
        .iter()
        .filter(|b| auth::bucket_allowed(ak, b))
    {
        x += &format!(
            "<Bucket><Name>{}</Name><CreationDate>{}</CreationDate></Bucket>",
            xml_escape(b),
            iso8601(0)
        );
    }
    x += "</Buckets></ListAllMyBucketsResult>";
    xml_response(StatusCode::OK, &x)
}

// ---------------------------------------------------------------------------------------------
// Deletes.

pub(crate) async fn delete_object(
    st: &AppState,
    bucket: &str,
    key: &str,
) -> Result<Response, S3Error> {
    st.dedup
        .delete_key(bucket, key)
        .await
        .map_err(|e| dedup_error(&e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
struct DeleteRequest {
    #[serde(rename = "Object", default)]
    objects: Vec<ObjectId>,
    #[serde(rename = "Quiet", default)]
    quiet: bool,
}

#[derive(Debug, Deserialize)]
struct ObjectId {
    #[serde(rename = "Key")]
    key: String,
}

pub(crate) async fn delete_objects(
    st: &AppState,
    ak: &AccessKey,
    bucket: &str,
    body: Body,
) -> Result<Response, S3Error> {
    let raw = read_xml_body(body).await?;
    let req: DeleteRequest = quick_xml::de::from_reader(raw.as_slice()).map_err(malformed_xml)?;
    if req.objects.len() > MAX_DELETE {
        return Err(malformed_xml("more than 1000 keys"));
    }
    let mut x = format!("<DeleteResult xmlns=\"{XMLNS}\">");
    for o in &req.objects {
        let outcome = if !auth::key_allowed(ak, bucket, &o.key) {
            Err(("AccessDenied", "Access Denied".to_owned()))
        } else if let Err(e) = validate_key(&o.key) {
            Err((e.code, e.message))
        } else {
            st.dedup
                .delete_key(bucket, &o.key)
                .await
                .map_err(|e| ("InternalError", dedup_error(&e).message))
        };
        match outcome {
            Ok(()) if req.quiet => {}
            Ok(()) => x += &format!("<Deleted><Key>{}</Key></Deleted>", xml_escape(&o.key)),
            Err((code, message)) => {
                x += &format!(
                    "<Error><Key>{}</Key><Code>{code}</Code><Message>{}</Message></Error>",
                    xml_escape(&o.key),
                    xml_escape(&message)
                );
            }
        }
    }
    x += "</DeleteResult>";
    Ok(xml_response(StatusCode::OK, &x))
}

// ---------------------------------------------------------------------------------------------
// Copy.

/// `x-amz-copy-source`: `[/]bucket/key` URL-encoded; a `versionId` other than `null` is refused.
fn parse_copy_source(v: &str) -> Result<(String, String), S3Error> {
    let (path, query) = v.split_once('?').unwrap_or((v, ""));
    if !query.is_empty() && query != "versionId=null" {
        return Err(S3Error::not_implemented("copying a specific version"));
    }
    let bad = || {
        S3Error::bad_request(
            "InvalidArgument",
            "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
        )
    };
    let decoded = crate::sigv4::percent_decode(path.trim_start_matches('/')).map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (b, k) = decoded.split_once('/').ok_or_else(bad)?;
    if b.is_empty() || k.is_empty() {
        return Err(bad());
    }
    Ok((b.to_owned(), k.to_owned()))
}

async fn copy_source(
    st: &AppState,
    ak: &AccessKey,
    headers: &HeaderMap,
) -> Result<std::sync::Arc<Manifest>, S3Error> {
    let src = header_str(headers, "x-amz-copy-source").unwrap_or_default();
    let (sb, sk) = parse_copy_source(src)?;
    validate_key(&sk)?;
    if !st.settings.buckets.contains(&sb) {
        return Err(S3Error::new(
            StatusCode::NOT_FOUND,
            "NoSuchBucket",
            "The specified bucket does not exist",
        ));
    }
    if !auth::key_allowed(ak, &sb, &sk) {
        return Err(scope_denied());
    }
    let m = st
        .dedup
        .manifest(&sb, &sk)
        .await
        .map_err(|e| dedup_error(&e))?
        .ok_or_else(no_such_key)?;
    conditions(headers, &m.header, "x-amz-copy-source-")?;
    Ok(m)
}

pub(crate) async fn copy_object(
    st: &AppState,
    ak: &AccessKey,
    bucket: &str,
    key: &str,
    headers: &HeaderMap,
) -> Result<Response, S3Error> {
    let src = copy_source(st, ak, headers).await?;
    check_put_conditions(st, bucket, key, headers).await?;
    let replace = match header_str(headers, "x-amz-metadata-directive") {
        None | Some("COPY") => false,
        Some("REPLACE") => true,
        Some(other) => {
            return Err(S3Error::bad_request(
                "InvalidArgument",
                format!("Unknown metadata directive {other:?}"),
            ));
        }
    };
    let (sb, sk) = (&src.header.bucket, &src.header.key);
    if !replace && sb == bucket && sk == key {
        return Err(S3Error::bad_request(
            "InvalidRequest",
            "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes.",
        ));
    }
    let obj = if replace {
        NewObject {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            etag: src.header.etag.clone(),
            content_type: header_str(headers, "content-type").map(str::to_owned),
            metadata: user_metadata(headers),
            attrs: crate::dedup::manifest::ObjectAttrs {
                checksums: src.header.attrs.checksums.clone(),
                ..stored_attrs(headers)
            },
        }
    } else {
        NewObject {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            etag: src.header.etag.clone(),
            content_type: src.header.content_type.clone(),
            metadata: src.header.metadata.clone(),
            attrs: src.header.attrs.clone(),
        }
    };
    let h = st
        .dedup
        .copy_key(&src, obj)
        .await
        .map_err(|e| dedup_error(&e))?;
    Ok(xml_response(
        StatusCode::OK,
        &format!(
            "<CopyObjectResult xmlns=\"{XMLNS}\"><LastModified>{}</LastModified><ETag>{}</ETag></CopyObjectResult>",
            iso8601(h.last_modified),
            xml_escape(&h.etag)
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Multipart.

fn multipart_error(e: MultipartError) -> S3Error {
    match e {
        MultipartError::NoSuchUpload(_) => S3Error::new(
            StatusCode::NOT_FOUND,
            "NoSuchUpload",
            "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.",
        ),
        MultipartError::InvalidPart(_) => S3Error::bad_request("InvalidPart", e.to_string()),
        MultipartError::InvalidPartOrder(_) => {
            S3Error::bad_request("InvalidPartOrder", e.to_string())
        }
        MultipartError::EntityTooSmall { .. } => {
            S3Error::bad_request("EntityTooSmall", e.to_string())
        }
        MultipartError::NoParts => malformed_xml("no parts"),
        MultipartError::Dedup(d) => dedup_error(&d),
    }
}

fn upload_id(query: &[(String, String)]) -> Result<&str, S3Error> {
    let id = q(query, "uploadId").unwrap_or("");
    if multipart::valid_upload_id(id) {
        Ok(id)
    } else {
        Err(multipart_error(MultipartError::NoSuchUpload(id.to_owned())))
    }
}

/// The upload `?uploadId=` names, which must exist and be an upload of `key`.
async fn upload_of_key<'q>(
    st: &AppState,
    bucket: &str,
    key: &str,
    query: &'q [(String, String)],
) -> Result<(&'q str, UploadMeta), S3Error> {
    let id = upload_id(query)?;
    let meta = st
        .dedup
        .upload_meta(bucket, id)
        .await
        .map_err(multipart_error)?;
    if meta.key != key {
        return Err(multipart_error(MultipartError::NoSuchUpload(id.to_owned())));
    }
    Ok((id, meta))
}

pub(crate) async fn create_multipart(
    st: &AppState,
    bucket: &str,
    key: &str,
    headers: &HeaderMap,
) -> Result<Response, S3Error> {
    if header_str(headers, "x-amz-checksum-algorithm").is_some() {
        // Part checksums are verified per part (CRC32); whole-object checksums of multipart
        // uploads are not kept.
        tracing::debug!("multipart checksum algorithm requested");
    }
    let meta = UploadMeta {
        key: key.to_owned(),
        initiated: multipart::now_secs(),
        content_type: header_str(headers, "content-type").map(str::to_owned),
        metadata: user_metadata(headers),
        attrs: stored_attrs(headers),
    };
    let id = st
        .dedup
        .create_upload(bucket, &meta)
        .await
        .map_err(|e| dedup_error(&e))?;
    Ok(xml_response(
        StatusCode::OK,
        &format!(
            "<InitiateMultipartUploadResult xmlns=\"{XMLNS}\"><Bucket>{}</Bucket><Key>{}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>",
            xml_escape(bucket),
            xml_escape(key)
        ),
    ))
}

fn part_number(query: &[(String, String)]) -> Result<u32, S3Error> {
    q(query, "partNumber")
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| (1..=multipart::MAX_PART_NUMBER).contains(n))
        .ok_or_else(|| {
            S3Error::bad_request(
                "InvalidArgument",
                "Part number must be an integer between 1 and 10000, inclusive",
            )
        })
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn upload_part(
    st: &AppState,
    bucket: &str,
    key: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
    payload: PayloadMode,
    body: Body,
) -> Result<Response, S3Error> {
    let n = part_number(query)?;
    // Refused before the body is read: a part for an unknown upload costs nothing.
    let (id, _) = upload_of_key(st, bucket, key, query).await?;
    let r = receive_body(st, headers, payload, body).await?;
    let etag = format!("\"{}\"", hex::encode(r.md5));
    st.dedup
        .publish_part(r.staged, bucket, id, n, etag.clone())
        .await
        .map_err(multipart_error)?;
    let mut resp = StatusCode::OK.into_response();
    resp.headers_mut()
        .insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex"));
    Ok(resp)
}

#[derive(Debug, Deserialize)]
struct CompleteRequest {
    #[serde(rename = "Part", default)]
    parts: Vec<CompletedPart>,
}

#[derive(Debug, Deserialize)]
struct CompletedPart {
    #[serde(rename = "PartNumber")]
    number: u32,
    #[serde(rename = "ETag")]
    etag: String,
}

pub(crate) async fn complete_multipart(
    st: &AppState,
    bucket: &str,
    key: &str,
    query: &[(String, String)],
    body: Body,
) -> Result<Response, S3Error> {
    let (id, _) = upload_of_key(st, bucket, key, query).await?;
    let raw = read_xml_body(body).await?;
    let req: CompleteRequest = quick_xml::de::from_reader(raw.as_slice()).map_err(malformed_xml)?;
    let parts: Vec<(u32, String)> = req.parts.into_iter().map(|p| (p.number, p.etag)).collect();
    let h = st
        .dedup
        .complete_upload(bucket, id, &parts)
        .await
        .map_err(multipart_error)?;
    Ok(xml_response(
        StatusCode::OK,
        &format!(
            "<CompleteMultipartUploadResult xmlns=\"{XMLNS}\"><Location>/{}/{}</Location><Bucket>{}</Bucket><Key>{}</Key><ETag>{}</ETag></CompleteMultipartUploadResult>",
            xml_escape(bucket),
            xml_escape(key),
            xml_escape(bucket),
            xml_escape(key),
            xml_escape(&h.etag)
        ),
    ))
}

pub(crate) async fn abort_multipart(
    st: &AppState,
    bucket: &str,
    key: &str,
    query: &[(String, String)],
) -> Result<Response, S3Error> {
    let (id, _) = upload_of_key(st, bucket, key, query).await?;
    st.dedup
        .abort_upload(bucket, id)
        .await
        .map_err(multipart_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn list_parts(
    st: &AppState,
    bucket: &str,
    key: &str,
    query: &[(String, String)],
) -> Result<Response, S3Error> {
    let id = upload_id(query)?;
    let max = max_keys(query, "max-parts")?;
    let marker: u32 = q(query, "part-number-marker")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let parts = st
        .dedup
        .list_parts(bucket, id)
        .await
        .map_err(multipart_error)?;
    let mut page: Vec<_> = parts.into_iter().filter(|p| p.number > marker).collect();
    let truncated = page.len() > max;
    page.truncate(max);
    let mut x = format!(
        "<ListPartsResult xmlns=\"{XMLNS}\"><Bucket>{}</Bucket><Key>{}</Key><UploadId>{id}</UploadId><PartNumberMarker>{marker}</PartNumberMarker>",
        xml_escape(bucket),
        xml_escape(key)
    );
    if let Some(last) = page.last().filter(|_| truncated) {
        x += &format!(
            "<NextPartNumberMarker>{}</NextPartNumberMarker>",
            last.number
        );
    }
    x += &format!("<MaxParts>{max}</MaxParts><IsTruncated>{truncated}</IsTruncated>");
    for p in &page {
        x += &format!(
            "<Part><PartNumber>{}</PartNumber><LastModified>{}</LastModified><ETag>{}</ETag><Size>{}</Size></Part>",
            p.number,
            iso8601(p.last_modified),
            xml_escape(&p.etag),
            p.size
        );
    }
    x += "</ListPartsResult>";
    Ok(xml_response(StatusCode::OK, &x))
}

pub(crate) async fn list_uploads(
    st: &AppState,
    ak: &AccessKey,
    bucket: &str,
    query: &[(String, String)],
) -> Result<Response, S3Error> {
    let prefix = q(query, "prefix").unwrap_or("");
    let max = max_keys(query, "max-uploads")?;
    let url = encoding_url(query)?;
    let all = st
        .dedup
        .list_uploads(bucket)
        .await
        .map_err(|e| dedup_error(&e))?;
    // Resume after (key-marker, upload-id-marker); without an upload id, after every upload of the key.
    let key_marker = q(query, "key-marker").unwrap_or("");
    let id_marker = q(query, "upload-id-marker");
    let after = |key: &str, id: &str| match id_marker {
        Some(m) if !key_marker.is_empty() => (key, id) > (key_marker, m),
        _ => key > key_marker,
    };
    let mut page: Vec<_> = all
        .into_iter()
        .filter(|(id, m)| {
            m.key.starts_with(prefix) && after(&m.key, id) && auth::key_allowed(ak, bucket, &m.key)
        })
        .collect();
    let truncated = page.len() > max;
    page.truncate(max);
    let mut x = format!(
        "<ListMultipartUploadsResult xmlns=\"{XMLNS}\"><Bucket>{}</Bucket><KeyMarker>{}</KeyMarker><UploadIdMarker>{}</UploadIdMarker><Prefix>{}</Prefix><MaxUploads>{max}</MaxUploads><IsTruncated>{truncated}</IsTruncated>",
        xml_escape(bucket),
        encode_key(key_marker, url),
        xml_escape(id_marker.unwrap_or("")),
        encode_key(prefix, url)
    );
    if let Some((id, m)) = page.last().filter(|_| truncated) {
        x += &format!(
            "<NextKeyMarker>{}</NextKeyMarker><NextUploadIdMarker>{id}</NextUploadIdMarker>",
            encode_key(&m.key, url)
        );
    }
    for (id, m) in &page {
        x += &format!(
            "<Upload><Key>{}</Key><UploadId>{id}</UploadId><Initiated>{}</Initiated><StorageClass>STANDARD</StorageClass></Upload>",
            encode_key(&m.key, url),
            iso8601(m.initiated)
        );
    }
    x += "</ListMultipartUploadsResult>";
    Ok(xml_response(StatusCode::OK, &x))
}

/// The listing name limit applies to every key that gets a listing entry.
pub(crate) fn check_listable(key: &str) -> Result<(), S3Error> {
    if key.len() > listing::LISTABLE_KEY_MAX {
        return Err(S3Error::bad_request(
            "KeyTooLongError",
            format!(
                "Your key is too long: this proxy stores keys of at most {} bytes",
                listing::LISTABLE_KEY_MAX
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso8601() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601(1_764_633_600 + 3723), "2025-12-02T01:02:03.000Z");
    }

    #[test]
    fn copy_sources_parse() {
        assert_eq!(
            parse_copy_source("/b/tmp/uploads/a%20b").unwrap(),
            ("b".to_owned(), "tmp/uploads/a b".to_owned())
        );
        assert_eq!(
            parse_copy_source("b/k?versionId=null").unwrap(),
            ("b".to_owned(), "k".to_owned())
        );
        assert_eq!(parse_copy_source("b").unwrap_err().code, "InvalidArgument");
        assert_eq!(
            parse_copy_source("/b/").unwrap_err().code,
            "InvalidArgument"
        );
        assert_eq!(
            parse_copy_source("b/k?versionId=3").unwrap_err().code,
            "NotImplemented"
        );
    }

    #[test]
    fn etag_lists() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("x, \"abc\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }

    #[test]
    fn xml_requests_parse() {
        let c: CompleteRequest = quick_xml::de::from_reader(
            &b"<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Part><ETag>\"a\"</ETag><PartNumber>1</PartNumber><ChecksumCRC32>x</ChecksumCRC32></Part><Part><PartNumber>2</PartNumber><ETag>b</ETag></Part></CompleteMultipartUpload>"[..],
        )
        .unwrap();
        assert_eq!(c.parts.len(), 2);
        assert_eq!((c.parts[0].number, c.parts[0].etag.as_str()), (1, "\"a\""));
        let d: DeleteRequest = quick_xml::de::from_reader(
            &b"<Delete><Quiet>true</Quiet><Object><Key>a&amp;b</Key></Object><Object><Key>c</Key><VersionId>null</VersionId></Object></Delete>"[..],
        )
        .unwrap();
        assert!(d.quiet);
        assert_eq!(d.objects[0].key, "a&b");
        assert!(quick_xml::de::from_reader::<_, CompleteRequest>(&b"<Complete"[..]).is_err());
    }
}
