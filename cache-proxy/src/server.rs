//! The HTTP front: S3 GET/HEAD/PUT on `/<bucket>/<key>`. Every path is an S3 path here; the
//! operations endpoints live on their own listener (`ops`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::auth::{self, PayloadMode, RequestParts};
use crate::bodyrate::{BodyRateError, MinRateStream};
use crate::chunked::AwsChunkedDecoder;
use crate::config::Settings;
use crate::dedup::manifest::Manifest;
use crate::dedup::{DedupError, DedupStore, NewObject};
use crate::digests::{DigestStage, Digests, NamedChecksum};
use crate::metrics::Metrics;
use crate::s3api;
use crate::s3error::S3Error;
pub use crate::sigv4::access_key_hint;
use crate::sigv4::{self, AuthError};
use crate::store::StoreError;

/// How long a presigned GET URL keeps serving the manifest version it first saw (parallel ranged GETs
/// of one URL must not mix versions, reference/cache.md §1.4).
const PIN_TTL: Duration = Duration::from_mins(15);
const MAX_KEY_BYTES: usize = 1024;

#[derive(Debug)]
pub struct AppState {
    pub settings: Settings,
    pub dedup: Arc<DedupStore>,
    pub metrics: Arc<Metrics>,
    #[allow(clippy::type_complexity)] // signature digest → (pinned at, manifest)
    pins: Mutex<HashMap<[u8; 32], (Instant, Arc<Manifest>)>>,
}

impl AppState {
    #[must_use]
    pub fn new(settings: Settings, dedup: Arc<DedupStore>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            dedup,
            metrics,
            pins: Mutex::new(HashMap::new()),
        })
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(s3).with_state(state)
}

fn request_id() -> String {
    format!("{:016X}", rand::random::<u64>())
}

async fn s3(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let rid = request_id();
    let head = req.method() == Method::HEAD;
    let method = req.method().clone();
    let resource = req.uri().path().to_owned();
    let (op, result) = handle(&st, req).await;
    let (resp, access_key) = match result {
        Ok((resp, ak)) => (resp, ak),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(code = e.code, message = %e.message, "request failed");
            }
            (e.into_response(&resource, &rid, head), None)
        }
    };
    let mut resp = resp;
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-amz-request-id", v);
    }
    let status = resp.status().as_u16();
    st.metrics.observe(op, status, started.elapsed());
    // Paths can carry cache keys but never credentials; signatures live in the query, which is not logged.
    // Access key ids are shown only by their last characters, like the AWS console does.
    let key_hint = access_key
        .as_deref()
        .map_or_else(|| "-".to_owned(), access_key_hint);
    tracing::info!(op, %method, path = %resource, status, access_key = %key_hint, request_id = %rid, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "s3 request");
    resp
}

type Handled = Result<(Response, Option<String>), S3Error>;

/// Headers that must appear at most once: with two, the signed value and the used value could differ.
const SINGLETON_HEADERS: &[&str] = &[
    "authorization",
    "x-amz-date",
    "x-amz-content-sha256",
    "x-amz-decoded-content-length",
    "x-amz-checksum-crc32",
    "x-amz-checksum-crc32c",
    "x-amz-checksum-crc64nvme",
    "x-amz-checksum-sha1",
    "x-amz-checksum-sha256",
    "x-amz-trailer",
    "content-md5",
    "content-encoding",
    "range",
    "host",
];

/// Reject repeated query parameter names (compared case-insensitively) and repeated singleton
/// headers, so that no two parts of the proxy can read different values of one parameter.
fn reject_duplicates(query: &[(String, String)], headers: &HeaderMap) -> Result<(), S3Error> {
    let mut names: Vec<String> = query.iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
    names.sort_unstable();
    if let Some([name, _]) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(S3Error::bad_request(
            "InvalidArgument",
            format!("query parameter {name:?} is given more than once"),
        ));
    }
    if let Some(h) = SINGLETON_HEADERS
        .iter()
        .find(|h| headers.get_all(**h).iter().nth(1).is_some())
    {
        return Err(S3Error::bad_request(
            "InvalidArgument",
            format!("header {h} is given more than once"),
        ));
    }
    Ok(())
}

#[allow(clippy::match_same_arms)] // one arm per error keeps the mapping auditable
fn auth_error(e: &AuthError) -> S3Error {
    match e {
        AuthError::Expired => S3Error::access_denied("Request has expired"),
        AuthError::TooEarly => {
            S3Error::access_denied("Request is not yet valid (X-Amz-Date is in the future)")
        }
        AuthError::ExpiresTooLong => {
            S3Error::bad_request("AuthorizationQueryParametersError", e.to_string())
        }
        AuthError::WrongRegion { .. } => {
            S3Error::bad_request("AuthorizationQueryParametersError", e.to_string())
        }
        AuthError::Malformed(m) => S3Error::bad_request("InvalidArgument", m.clone()),
        AuthError::UnknownAccessKey(_) => S3Error::new(
            StatusCode::FORBIDDEN,
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
        ),
        AuthError::MissingSignedHeader(h) => {
            S3Error::access_denied(format!("signed header {h} is missing from the request"))
        }
        AuthError::SignatureMismatch => S3Error::new(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            e.to_string(),
        ),
        AuthError::Forbidden => S3Error::access_denied("Access Denied"),
        AuthError::Anonymous => S3Error::access_denied(e.to_string()),
    }
}

fn digest_error(e: crate::digests::DigestStopped) -> S3Error {
    tracing::error!(error = %e, "upload digests");
    S3Error::internal("We encountered an internal error. Please try again.")
}

pub(crate) fn dedup_error(e: &DedupError) -> S3Error {
    match e {
        // Retryable: the backend is busy, or a concurrent GC took packs this upload reused.
        DedupError::Store(StoreError::Unavailable { .. }) | DedupError::ReusedPacksGone(_) => {
            tracing::warn!(error = %e, "retryable storage error");
            S3Error::slow_down()
        }
        other => {
            tracing::error!(error = %other, "storage error");
            S3Error::internal("We encountered an internal error. Please try again.")
        }
    }
}

/// Reject keys that could mean something else on a filesystem or exceed S3 limits.
pub(crate) fn validate_key(key: &str) -> Result<(), S3Error> {
    if key.len() > MAX_KEY_BYTES {
        return Err(S3Error::bad_request(
            "KeyTooLongError",
            "Your key is too long (over 1024 bytes)",
        ));
    }
    if key.contains('\0') {
        return Err(S3Error::bad_request(
            "InvalidArgument",
            "object key contains a NUL byte",
        ));
    }
    if key.split('/').any(|s| s == ".." || s == ".") {
        return Err(S3Error::bad_request(
            "InvalidRequest",
            "object key contains a '.' or '..' path segment",
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_lines)] // request parsing and dispatch in one readable sequence
async fn handle(st: &AppState, req: Request) -> (&'static str, Handled) {
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path();
    let Ok(path) = sigv4::percent_decode(raw_path) else {
        return (
            "Unknown",
            Err(S3Error::bad_request(
                "InvalidURI",
                "Couldn't parse the specified URI.",
            )),
        );
    };
    let Ok(path_str) = std::str::from_utf8(&path) else {
        return (
            "Unknown",
            Err(S3Error::bad_request("InvalidURI", "path is not UTF-8")),
        );
    };
    let trimmed = path_str.strip_prefix('/').unwrap_or(path_str);
    let (bucket, key) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    let Ok(query) = sigv4::parse_query(parts.uri.query().unwrap_or("")) else {
        return (
            "Unknown",
            Err(S3Error::bad_request(
                "InvalidURI",
                "Couldn't parse the specified URI.",
            )),
        );
    };
    if let Err(e) = reject_duplicates(&query, &parts.headers) {
        return ("Unknown", Err(e));
    }
    let op = operation(&parts.method, bucket, key, &query, &parts.headers);
    if let Err(e) = validate_key(key) {
        return (op, Err(e));
    }
    let rp = RequestParts {
        method: parts.method.as_str(),
        path: &path,
        query: &query,
        headers: &parts.headers,
        bucket,
        key,
    };
    let authd = match auth::authenticate(
        &st.settings.access_keys,
        &st.settings.region,
        &rp,
        SystemTime::now(),
    ) {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(error = %e, "authentication failed");
            return (op, Err(auth_error(&e)));
        }
    };
    let Some(access) = st
        .settings
        .access_keys
        .iter()
        .find(|k| k.id == authd.access_key)
    else {
        return (op, Err(S3Error::access_denied("Access Denied")));
    };
    if !bucket.is_empty() && !st.settings.buckets.iter().any(|b| b == bucket) {
        return (
            op,
            Err(S3Error::new(
                StatusCode::NOT_FOUND,
                "NoSuchBucket",
                "The specified bucket does not exist",
            )),
        );
    }
    // Sub-resources and parameters an operation does not take (?acl, ?tagging, ?versionId, ...)
    // are other S3 features: refused, never ignored.
    let allowed = allowed_params(op);
    let sub = query.iter().find(|(k, _)| {
        !k.to_ascii_lowercase().starts_with("x-amz-")
            && k != "x-id"
            && !allowed.contains(&k.as_str())
    });
    if let Some((k, _)) = sub {
        return (
            op,
            Err(S3Error::not_implemented(&format!(
                "the ?{k} parameter on {op}"
            ))),
        );
    }
    let writes_key = matches!(
        op,
        "PutObject" | "CopyObject" | "CreateMultipartUpload" | "UploadPart"
    );
    if writes_key && let Err(e) = s3api::check_listable(key) {
        return (op, Err(e));
    }
    let ak = Some(authd.access_key.clone());
    let h = &parts.headers;
    let result = match op {
        "GetObject" | "HeadObject" => {
            get_object(
                st,
                bucket,
                key,
                h,
                &query,
                op == "HeadObject",
                authd.presigned_signature.as_deref(),
            )
            .await
        }
        "PutObject" => put_object(st, bucket, key, h, authd.payload, body).await,
        "CopyObject" => s3api::copy_object(st, access, bucket, key, h).await,
        "DeleteObject" => s3api::delete_object(st, bucket, key).await,
        "CreateMultipartUpload" => s3api::create_multipart(st, bucket, key, h).await,
        "UploadPart" => s3api::upload_part(st, bucket, key, &query, h, authd.payload, body).await,
        "CompleteMultipartUpload" => s3api::complete_multipart(st, bucket, key, &query, body).await,
        "AbortMultipartUpload" => s3api::abort_multipart(st, bucket, key, &query).await,
        "ListParts" => s3api::list_parts(st, bucket, key, &query).await,
        "ListObjects" | "ListObjectsV2" => {
            s3api::list_objects(st, access, bucket, &query, op == "ListObjectsV2").await
        }
        "ListMultipartUploads" => s3api::list_uploads(st, access, bucket, &query).await,
        "DeleteObjects" => s3api::delete_objects(st, access, bucket, body).await,
        "ListBuckets" => Ok(s3api::list_buckets(st, access)),
        "GetBucketLocation" => Ok(location(&st.settings.region)),
        "HeadBucket" => Ok(StatusCode::OK.into_response()),
        // Buckets are configured, not created; clients that create before writing (rclone)
        // accept S3's answer for a bucket they already own.
        "CreateBucket" => Err(S3Error::new(
            StatusCode::CONFLICT,
            "BucketAlreadyOwnedByYou",
            "Your previous request to create the named bucket succeeded and you already own it.",
        )),
        _ => Err(S3Error::not_implemented(&format!(
            "{} on {}",
            parts.method,
            if bucket.is_empty() {
                "the service"
            } else if key.is_empty() {
                "a bucket"
            } else {
                "an object"
            }
        ))),
    };
    (op, result.map(|r| (r, ak)))
}

/// The S3 operation a request names (method, path shape, sub-resource, copy header).
fn operation(
    method: &Method,
    bucket: &str,
    key: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
) -> &'static str {
    let has = |n: &str| query.iter().any(|(k, _)| k == n);
    let copy = headers.contains_key("x-amz-copy-source");
    match (method, bucket.is_empty(), key.is_empty()) {
        (&Method::GET, true, _) => "ListBuckets",
        (&Method::GET, false, true) if has("location") => "GetBucketLocation",
        (&Method::GET, false, true) if has("uploads") => "ListMultipartUploads",
        (&Method::GET, false, true) if query.iter().any(|(k, v)| k == "list-type" && v == "2") => {
            "ListObjectsV2"
        }
        (&Method::GET, false, true) => "ListObjects",
        (&Method::HEAD, false, true) => "HeadBucket",
        (&Method::PUT, false, true) if query.is_empty() => "CreateBucket",
        (&Method::POST, false, true) if has("delete") => "DeleteObjects",
        (&Method::GET, false, false) if has("uploadId") => "ListParts",
        (&Method::GET, false, false) => "GetObject",
        (&Method::HEAD, false, false) => "HeadObject",
        (&Method::PUT, false, false) if has("uploadId") && copy => "UploadPartCopy",
        (&Method::PUT, false, false) if has("uploadId") => "UploadPart",
        (&Method::PUT, false, false) if copy => "CopyObject",
        (&Method::PUT, false, false) => "PutObject",
        (&Method::POST, false, false) if has("uploads") => "CreateMultipartUpload",
        (&Method::POST, false, false) if has("uploadId") => "CompleteMultipartUpload",
        (&Method::DELETE, false, false) if has("uploadId") => "AbortMultipartUpload",
        (&Method::DELETE, false, false) => "DeleteObject",
        _ => "Unsupported",
    }
}

/// Query parameters each operation understands (besides `X-Amz-*` and `x-id`).
fn allowed_params(op: &str) -> &'static [&'static str] {
    const RESPONSE: &[&str] = &[
        "response-content-type",
        "response-content-disposition",
        "response-cache-control",
        "response-content-encoding",
        "response-content-language",
        "response-expires",
    ];
    match op {
        "GetObject" | "HeadObject" => RESPONSE,
        "ListObjects" => &["prefix", "delimiter", "marker", "max-keys", "encoding-type"],
        "ListObjectsV2" => &[
            "list-type",
            "prefix",
            "delimiter",
            "continuation-token",
            "start-after",
            "max-keys",
            "encoding-type",
            "fetch-owner",
        ],
        "ListMultipartUploads" => &[
            "uploads",
            "prefix",
            "max-uploads",
            "key-marker",
            "upload-id-marker",
            "encoding-type",
        ],
        "ListBuckets" => &["max-buckets"],
        "GetBucketLocation" => &["location"],
        "DeleteObjects" => &["delete"],
        "UploadPart" | "UploadPartCopy" => &["partNumber", "uploadId"],
        "CreateMultipartUpload" => &["uploads"],
        "CompleteMultipartUpload" | "AbortMultipartUpload" => &["uploadId"],
        "ListParts" => &[
            "uploadId",
            "max-parts",
            "part-number-marker",
            "encoding-type",
        ],
        _ => &[],
    }
}

fn location(region: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<LocationConstraint xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">{}</LocationConstraint>",
        if region == "us-east-1" { "" } else { region }
    );
    ([(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

/// Parsed `Range` header: `Ok(None)` = whole object; `Err` = unsatisfiable (416).
fn parse_range(h: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Multiple ranges are not supported by S3 either; serve the whole object.
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size)
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            size
        } else {
            let Ok(last) = b.parse::<u64>() else {
                return Ok(None);
            };
            if last < start {
                return Ok(None);
            }
            last.saturating_add(1).min(size)
        };
        if start >= size {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

async fn get_object(
    st: &AppState,
    bucket: &str,
    key: &str,
    headers: &HeaderMap,
    query: &[(String, String)],
    head: bool,
    pin: Option<&str>,
) -> Result<Response, S3Error> {
    let pin_id: Option<[u8; 32]> = pin
        .filter(|_| !head)
        .map(|sig| Sha256::digest(sig.as_bytes()).into());
    let pinned = pin_id.and_then(|id| {
        let mut pins = st.pins.lock().expect("pins lock");
        let now = Instant::now();
        pins.retain(|_, (t, _)| now.duration_since(*t) < PIN_TTL);
        pins.get(&id).map(|(_, m)| m.clone())
    });
    let m = if let Some(m) = pinned {
        m
    } else {
        let Some(m) = st
            .dedup
            .manifest(bucket, key)
            .await
            .map_err(|e| dedup_error(&e))?
        else {
            return Err(S3Error::new(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            ));
        };
        if let Some(id) = pin_id {
            st.pins
                .lock()
                .expect("pins lock")
                .insert(id, (Instant::now(), m.clone()));
        }
        m
    };
    if let Err(e) = crate::s3api::read_conditions(headers, &m.header) {
        if e.status == StatusCode::NOT_MODIFIED {
            let mut resp = StatusCode::NOT_MODIFIED.into_response();
            object_headers(resp.headers_mut(), &m);
            resp.headers_mut().remove(header::CONTENT_TYPE);
            return Ok(resp);
        }
        return Err(e);
    }
    let size = m.header.size;
    let Ok(range) = parse_range(headers.get(header::RANGE), size) else {
        let mut e = S3Error::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "InvalidRange",
            "The requested range is not satisfiable",
        )
        .into_response(&format!("/{bucket}/{key}"), &request_id(), head);
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
            e.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return Ok(e);
    };
    let (start, end) = range.unwrap_or((0, size));
    let mut resp = if head {
        Response::new(Body::empty())
    } else {
        Metrics::add(&st.metrics.logical_bytes_out, end - start);
        let dedup = st.dedup.clone();
        let (b, k) = (bucket.to_owned(), key.to_owned());
        tokio::spawn(async move { dedup.note_read(&b, &k).await });
        Response::new(Body::from_stream(st.dedup.read(m.clone(), start, end)))
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if let Some((a, z)) = range {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        let v = HeaderValue::from_str(&format!("bytes {a}-{}/{size}", z - 1)).expect("ascii");
        resp.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    object_headers(resp.headers_mut(), &m);
    if range.is_none()
        && header_str(headers, "x-amz-checksum-mode")
            .is_some_and(|v| v.eq_ignore_ascii_case("enabled"))
    {
        for (name, value) in &m.header.attrs.checksums {
            if let (Ok(n), Ok(v)) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                resp.headers_mut().insert(n, v);
            }
        }
    }
    // Presigned overrides (`response-content-type=...`): signed with the URL, so the signer chose them.
    for (name, value) in query {
        if let Some(h) = name.strip_prefix("response-")
            && let (Ok(hn), Ok(hv)) = (
                header::HeaderName::from_bytes(h.as_bytes()),
                HeaderValue::from_str(value),
            )
        {
            resp.headers_mut().insert(hn, hv);
        }
    }
    Ok(resp)
}

fn object_headers(h: &mut HeaderMap, m: &Manifest) {
    if let Ok(v) = HeaderValue::from_str(&m.header.etag) {
        h.insert(header::ETAG, v);
    }
    let lm = SystemTime::UNIX_EPOCH + Duration::from_secs(m.header.last_modified);
    h.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_str(&httpdate::fmt_http_date(lm)).expect("ascii date"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let ct = m
        .header
        .content_type
        .as_deref()
        .unwrap_or("application/octet-stream");
    if let Ok(v) = HeaderValue::from_str(ct) {
        h.insert(header::CONTENT_TYPE, v);
    }
    for (k, v) in &m.header.attrs.headers {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(name, value);
        }
    }
    for (k, v) in &m.header.metadata {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(format!("x-amz-meta-{k}").as_bytes()),
            HeaderValue::from_bytes(v.as_bytes()),
        ) {
            h.append(name, value);
        }
    }
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A request body received, verified and staged (not yet published).
pub(crate) struct Received {
    pub staged: crate::dedup::Staged,
    pub md5: [u8; 16],
    /// `(x-amz-checksum-<algorithm>, base64)` computed over the body and matched against every
    /// value the request declared.
    pub checksums: Vec<(String, String)>,
}

/// Checksum algorithms S3 clients send (`x-amz-checksum-*` headers or an `x-amz-trailer`).
const CHECKSUM_ALGORITHMS: [&str; 5] = ["crc32", "crc32c", "crc64nvme", "sha1", "sha256"];

/// The checksums a request asks for, by header name, computed with AWS's own implementations.
fn requested_checksums(headers: &HeaderMap) -> Vec<NamedChecksum> {
    let trailer = header_str(headers, "x-amz-trailer")
        .unwrap_or("")
        .to_ascii_lowercase();
    CHECKSUM_ALGORITHMS
        .iter()
        .map(|a| format!("x-amz-checksum-{a}"))
        .filter(|name| {
            headers.contains_key(name.as_str()) || trailer.split(',').any(|t| t.trim() == name)
        })
        .filter_map(|name| {
            let alg: aws_smithy_checksums::ChecksumAlgorithm =
                name.trim_start_matches("x-amz-checksum-").parse().ok()?;
            Some((name, alg.into_impl()))
        })
        .collect()
}

/// Receive a `PutObject` or `UploadPart` body: framing (aws-chunked where signed), size limit, stall and rate
/// limits, then every digest the request carries (payload SHA-256, Content-MD5, CRC32 header or
/// trailer). The body is chunked and uploaded while it arrives; nothing is published here.
#[allow(clippy::too_many_lines, clippy::similar_names)] // one linear pipeline: frame, verify, ingest
pub(crate) async fn receive_body(
    st: &AppState,
    headers: &HeaderMap,
    payload: PayloadMode,
    body: Body,
) -> Result<Received, S3Error> {
    use base64::Engine as _;
    check_body_framing(headers, &payload)?;
    let decoded_len: Option<u64> =
        header_str(headers, "x-amz-decoded-content-length").and_then(|v| v.parse().ok());
    // aws-chunked framing only where the signed payload hash declares it (`check_body_framing`
    // refused `Content-Encoding: aws-chunked` on anything else).
    let mut decoder = match &payload {
        PayloadMode::Chunked {
            signer,
            signed_trailer,
        } => Some(AwsChunkedDecoder::new(signer.clone(), *signed_trailer)),
        _ => None,
    };
    if decoder.is_some() && decoded_len.is_none() {
        return Err(S3Error::new(
            StatusCode::LENGTH_REQUIRED,
            "MissingContentLength",
            "aws-chunked bodies need x-amz-decoded-content-length",
        ));
    }
    let limit = st.settings.max_object_bytes;
    let declared = |name| header_str(headers, name).and_then(|v| v.trim().parse::<u64>().ok());
    // Checked before anything is spooled. Content-Length bounds aws-chunked bodies too, allowing for
    // the framing (chunk headers and signatures add well under 1/8).
    let framing_slack = if decoder.is_some() {
        limit / 8 + (1 << 20)
    } else {
        0
    };
    if decoded_len.is_some_and(|n| n > limit)
        || declared("content-length").is_some_and(|n| n > limit.saturating_add(framing_slack))
    {
        return Err(S3Error::bad_request(
            "EntityTooLarge",
            "Your proposed upload exceeds the maximum allowed object size.",
        ));
    }

    // Chunked, hashed and uploaded while it arrives; published only after every check below.
    let mut ingest = st.dedup.begin_ingest().await.map_err(|e| dedup_error(&e))?;
    let mut digests = DigestStage::start(Digests::new(
        matches!(payload, PayloadMode::Sha256(_)),
        requested_checksums(headers),
    ));
    let mut size = 0u64;
    let mut stream = MinRateStream::new(body.into_data_stream(), st.settings.http.min_upload_rate);
    let idle = st.settings.http.body_idle_timeout;
    // A body that stops arriving is cut after `idle`, so a slow client holds a connection for bounded time.
    while let Some(frame) = tokio::time::timeout(idle, stream.next())
        .await
        .map_err(|_| {
            tracing::info!(idle_secs = idle.as_secs(), "upload body stalled");
            S3Error::bad_request(
                "RequestTimeout",
                "Your socket connection to the server was not read from or written to within the timeout period.",
            )
        })?
    {
        let frame = frame.map_err(|e| body_read_error(&e))?;
        let data: Bytes = if let Some(dec) = decoder.as_mut() {
            let mut decoded = Vec::new();
            dec.feed(&frame, &mut |d| decoded.extend_from_slice(d))
                .map_err(|e| chunked_error(&e))?;
            Bytes::from(decoded)
        } else {
            frame
        };
        size += data.len() as u64;
        if size > limit {
            return Err(S3Error::bad_request(
                "EntityTooLarge",
                "Your proposed upload exceeds the maximum allowed object size.",
            ));
        }
        if data.is_empty() {
            continue;
        }
        digests.write(data.clone()).await.map_err(digest_error)?;
        ingest.write(data).await.map_err(|e| dedup_error(&e))?;
    }
    let mut checksums: Vec<(String, String)> = Vec::new();
    if let Some(dec) = decoder {
        checksums = dec.finish().map_err(|e| chunked_error(&e))?;
        if decoded_len != Some(size) {
            return Err(S3Error::bad_request(
                "IncompleteBody",
                format!(
                    "decoded {size} bytes but x-amz-decoded-content-length says {decoded_len:?}"
                ),
            ));
        }
    } else if let Some(n) = declared("content-length")
        && n != size
    {
        return Err(S3Error::bad_request(
            "IncompleteBody",
            "You did not provide the number of bytes specified by the Content-Length HTTP header",
        ));
    }
    let Digests {
        md5,
        sha256: sha,
        checksums: sums,
    } = digests.finish().await.map_err(digest_error)?;
    if let (PayloadMode::Sha256(want), Some(s)) = (&payload, sha)
        && hex::encode(s.finalize()) != *want
    {
        return Err(S3Error::bad_request(
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        ));
    }
    // Expected values: headers, then (aws-chunked) trailers; every one must match what arrived.
    for (name, _) in &sums {
        if let Some(v) = header_str(headers, name) {
            checksums.push((name.clone(), v.to_owned()));
        }
    }
    let mut verified = Vec::with_capacity(sums.len());
    for (name, c) in sums {
        let got = String::from_utf8_lossy(c.header_value().as_bytes()).into_owned();
        for (n, want) in checksums.iter().filter(|(n, _)| *n == name) {
            if want.trim() != got {
                let alg = n.trim_start_matches("x-amz-checksum-").to_ascii_uppercase();
                return Err(S3Error::bad_request(
                    "BadDigest",
                    format!("The {alg} you specified did not match the calculated checksum."),
                ));
            }
        }
        verified.push((name, got));
    }
    let md5: [u8; 16] = md5::Digest::finalize(md5).into();
    if let Some(v) = header_str(headers, "content-md5")
        && v.trim() != base64::engine::general_purpose::STANDARD.encode(md5)
    {
        return Err(S3Error::bad_request(
            "BadDigest",
            "The Content-MD5 you specified did not match what we received.",
        ));
    }
    let staged = ingest.finish().await.map_err(|e| dedup_error(&e))?;
    Metrics::add(&st.metrics.logical_bytes_in, size);
    Ok(Received {
        staged,
        md5,
        checksums: verified,
    })
}

/// `x-amz-meta-*` pairs of a request (names without the prefix).
pub(crate) fn user_metadata(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(k, v)| {
            k.as_str().strip_prefix("x-amz-meta-").map(|n| {
                (
                    n.to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
        })
        .collect()
}

/// Response headers a PUT stores with the object (returned on GET and HEAD, like S3).
pub(crate) const STORED_HEADERS: &[&str] = &[
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "expires",
];

pub(crate) fn stored_attrs(headers: &HeaderMap) -> crate::dedup::manifest::ObjectAttrs {
    let mut attrs = crate::dedup::manifest::ObjectAttrs::default();
    for name in STORED_HEADERS {
        let Some(v) = header_str(headers, name) else {
            continue;
        };
        // `aws-chunked` is framing of this request, not an encoding of the object.
        let v = if *name == "content-encoding" {
            v.split(',')
                .map(str::trim)
                .filter(|p| !p.eq_ignore_ascii_case("aws-chunked") && !p.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        } else {
            v.to_owned()
        };
        if !v.is_empty() {
            attrs.headers.push(((*name).to_owned(), v));
        }
    }
    attrs
}

async fn put_object(
    st: &AppState,
    bucket: &str,
    key: &str,
    headers: &HeaderMap,
    payload: PayloadMode,
    body: Body,
) -> Result<Response, S3Error> {
    crate::s3api::check_put_conditions(st, bucket, key, headers).await?;
    let r = receive_body(st, headers, payload, body).await?;
    let etag = format!("\"{}\"", hex::encode(r.md5));
    let obj = NewObject {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        etag: etag.clone(),
        content_type: header_str(headers, "content-type").map(str::to_owned),
        metadata: user_metadata(headers),
        attrs: crate::dedup::manifest::ObjectAttrs {
            checksums: r.checksums,
            ..stored_attrs(headers)
        },
    };
    st.dedup
        .publish(r.staged, obj)
        .await
        .map_err(|e| dedup_error(&e))?;
    let mut resp = StatusCode::OK.into_response();
    resp.headers_mut()
        .insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex"));
    Ok(resp)
}

/// A request body that failed while being read: too slow (S3's `RequestTimeout`), or cut short.
fn body_read_error(e: &BodyRateError<axum::Error>) -> S3Error {
    match e {
        BodyRateError::TooSlow { .. } => {
            tracing::info!(error = %e, "upload body too slow");
            S3Error::bad_request(
                "RequestTimeout",
                "Your socket connection to the server was not read from or written to within the timeout period.",
            )
        }
        BodyRateError::Body(e) => {
            tracing::info!(error = %e, "upload body ended early");
            S3Error::bad_request(
                "IncompleteBody",
                "You did not provide the number of bytes specified by the Content-Length HTTP header",
            )
        }
    }
}

/// aws-chunked framing is decoded only when the signed payload hash announces it (`STREAMING-*`).
/// A presigned URL signs `UNSIGNED-PAYLOAD`: decoding its body as aws-chunked would let anyone with
/// a URL pick the framing, trailers included (issue 16: a trailer flood on a presigned PUT).
fn check_body_framing(headers: &HeaderMap, payload: &PayloadMode) -> Result<(), S3Error> {
    let aws_chunked = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("aws-chunked"));
    if aws_chunked && !matches!(payload, PayloadMode::Chunked { .. }) {
        return Err(S3Error::bad_request(
            "InvalidArgument",
            "Content-Encoding aws-chunked needs a signed x-amz-content-sha256 of STREAMING-*; this request's payload hash (UNSIGNED-PAYLOAD or a SHA-256, as on presigned URLs) does not announce aws-chunked framing",
        ));
    }
    Ok(())
}

fn chunked_error(e: &crate::chunked::ChunkedError) -> S3Error {
    use crate::chunked::ChunkedError;
    match e {
        ChunkedError::Malformed(m) => S3Error::bad_request("IncompleteBody", m.clone()),
        ChunkedError::ChunkSignature | ChunkedError::TrailerSignature => S3Error::new(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            e.to_string(),
        ),
        ChunkedError::TooManyTrailers { .. } | ChunkedError::TrailersTooLarge { .. } => {
            S3Error::bad_request("MalformedTrailerError", e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_range(Some(&h("bytes=0-0")), 10), Ok(Some((0, 1))));
        assert_eq!(parse_range(Some(&h("bytes=2-")), 10), Ok(Some((2, 10))));
        assert_eq!(parse_range(Some(&h("bytes=-3")), 10), Ok(Some((7, 10))));
        assert_eq!(parse_range(Some(&h("bytes=5-100")), 10), Ok(Some((5, 10))));
        assert_eq!(parse_range(Some(&h("bytes=10-")), 10), Err(()));
        assert_eq!(parse_range(Some(&h("bytes=-0")), 10), Err(()));
        assert_eq!(parse_range(Some(&h("bytes=5-2")), 10), Ok(None));
        assert_eq!(parse_range(Some(&h("items=0-1")), 10), Ok(None));
        assert_eq!(parse_range(None, 10), Ok(None));
    }

    #[test]
    fn key_hints_hide_the_id() {
        assert_eq!(access_key_hint("runner-key"), "…-key");
        assert_eq!(access_key_hint("abcd"), "…");
        assert_eq!(access_key_hint("AKIAIOSFODNN7EXAMPLE"), "…MPLE");
    }

    #[test]
    fn duplicates_are_rejected() {
        let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let h = HeaderMap::new();
        assert!(reject_duplicates(&q(&[("a", "1"), ("b", "2")]), &h).is_ok());
        let e = reject_duplicates(
            &q(&[("X-Amz-Signature", "1"), ("x-amz-signature", "2")]),
            &h,
        )
        .unwrap_err();
        assert_eq!(e.code, "InvalidArgument");
        let mut h = HeaderMap::new();
        h.append("x-amz-date", HeaderValue::from_static("20250101T000000Z"));
        h.append("x-amz-date", HeaderValue::from_static("20250102T000000Z"));
        assert!(reject_duplicates(&[], &h).is_err());
    }

    #[test]
    fn bad_keys() {
        assert!(validate_key("project/1/main-protected").is_ok());
        assert_eq!(validate_key("a/../b").unwrap_err().code, "InvalidRequest");
        assert_eq!(validate_key("a/./b").unwrap_err().code, "InvalidRequest");
        assert_eq!(validate_key("a\0b").unwrap_err().code, "InvalidArgument");
        assert_eq!(
            validate_key(&"k".repeat(1025)).unwrap_err().code,
            "KeyTooLongError"
        );
    }
}
