//! S3-compatible `BlobStore` through aws-sdk-s3 (`MinIO`, AWS S3, GCS XML interop, s3s-fs in tests).
//!
//! Checksums are pinned to `WhenRequired`: since aws-sdk-rust 1.69 the default adds CRC32 aws-chunked
//! trailers that GCS rejects (reference/cache.md §3).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{BlobStore, ObjectInfo, StoreError};

/// Settings for one S3-compatible bucket.
#[derive(Clone)]
pub struct S3Settings {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Key prefix inside the bucket, e.g. `spotrun-cache/`.
    pub prefix: String,
    pub path_style: bool,
    pub auth: S3Auth,
    pub max_concurrency: usize,
    /// Bound on one backend request, body included: a stalled backend becomes 503 `SlowDown`.
    pub request_timeout: Duration,
}

/// How the proxy authenticates to the backend.
#[derive(Clone)]
pub enum S3Auth {
    /// `SigV4` with an access key (AWS, `MinIO`, GCS HMAC keys).
    Keys {
        access_key_id: String,
        secret_access_key: String,
    },
    /// GCS only: OAuth bearer tokens from the metadata server (GKE Workload Identity or the node's
    /// service account); `host` overrides `GCE_METADATA_HOST` / `metadata.google.internal`.
    GceMetadata { host: Option<String> },
}

// By hand: the derived Debug would print the secret key (`serve` logs the store settings at start).
impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("max_concurrency", &self.max_concurrency)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    /// Bounds in-flight backend requests; callers wait (queue) when it is exhausted.
    permits: Arc<Semaphore>,
    request_timeout: Duration,
    /// Set for `S3Auth::GceMetadata`.
    token: Option<super::gtoken::MetadataToken>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// A listed object as the store names it (without this store's key prefix).
    fn info(&self, obj: &aws_sdk_s3::types::Object) -> Option<ObjectInfo> {
        let k = obj.key()?;
        Some(ObjectInfo {
            key: k.strip_prefix(&self.prefix).unwrap_or(k).to_owned(),
            size: obj.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
            modified: obj
                .last_modified()
                .and_then(|d| SystemTime::try_from(*d).ok())
                .unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }

    #[must_use]
    pub fn new(s: &S3Settings) -> Self {
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(s.region.clone()))
            .endpoint_url(&s.endpoint)
            .force_path_style(s.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // One quick retry inside the SDK; the runner retries 5xx itself (reference/cache.md §1.4).
            .retry_config(RetryConfig::standard().with_max_attempts(2))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3).min(s.request_timeout))
                    .read_timeout(s.request_timeout)
                    .operation_attempt_timeout(s.request_timeout)
                    .build(),
            );
        let token = match &s.auth {
            S3Auth::Keys {
                access_key_id,
                secret_access_key,
            } => {
                conf = conf.credentials_provider(Credentials::new(
                    access_key_id,
                    secret_access_key,
                    None,
                    None,
                    "spotrun-cache-proxy",
                ));
                None
            }
            S3Auth::GceMetadata { host } => {
                let token = super::gtoken::MetadataToken::new(host.clone());
                // Nothing to sign with: requests go out unsigned and the interceptor adds the
                // bearer token.
                conf = conf
                    .allow_no_auth()
                    .interceptor(super::gtoken::BearerInterceptor(token.clone()));
                Some(token)
            }
        };
        Self {
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            permits: Arc::new(Semaphore::new(s.max_concurrency.max(1))),
            request_timeout: s.request_timeout,
            token,
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Run one backend call under the request timeout. The SDK's own timeouts end at the response
    /// head; a streamed body (GET) that stalls is only bounded here.
    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // Two attempts (retry_config) may each use the full attempt timeout.
        tokio::time::timeout(self.request_timeout * 2, call)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::unavailable(
                    op,
                    key,
                    format!("no answer within {:?}", self.request_timeout * 2),
                ))
            })
    }

    /// A backend slot, with a fresh bearer token first when the backend uses one.
    async fn permit(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        if let Some(token) = &self.token {
            token
                .ensure()
                .await
                .map_err(|e| StoreError::unavailable(op, key, e))?;
        }
        Ok(self
            .permits
            .acquire()
            .await
            .expect("semaphore is never closed"))
    }
}

/// 404 → `NotFound`; transport trouble, throttling and 5xx → Unavailable (retryable); other 4xx → Rejected.
fn classify<E>(op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    match status {
        Some(404) => StoreError::NotFound(key.to_owned()),
        // 408/429 are the backend asking us to slow down: retryable like 5xx.
        Some(s) if (400..500).contains(&s) && s != 429 && s != 408 => StoreError::Rejected {
            op,
            key: key.to_owned(),
            message: format!("HTTP {s}: {}", aws_sdk_s3::error::DisplayErrorContext(&err)),
        },
        _ => StoreError::unavailable(op, key, err),
    }
}

impl S3Store {
    /// One PUT of a whole object, bounded by the request timeout (the caller holds a permit).
    async fn put_body(&self, key: &str, body: ByteStream) -> Result<(), StoreError> {
        // Boxed: the SDK's put future is large (clippy::large_futures).
        self.timed(
            "put",
            key,
            Box::pin(async {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(self.full(key))
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| classify("put", key, e))
            }),
        )
        .await?;
        Ok(())
    }
}

/// Bytes read from a file per step while it is uploaded.
const PUT_FILE_READ: usize = 1 << 20;

#[async_trait::async_trait]
impl BlobStore for S3Store {
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let _p = self.permit("put", key).await?;
        // Read in 1 MiB blocks: each read of a file is a hop to the blocking pool, and the SDK's
        // 64 KiB default made a 16 MiB pack 256 of them.
        let body = ByteStream::read_from()
            .path(path)
            .buffer_size(PUT_FILE_READ)
            .build()
            .await
            .map_err(|e| StoreError::unavailable("put", key, e))?;
        self.put_body(key, body).await
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let _p = self.permit("put", key).await?;
        self.put_body(key, ByteStream::from(data)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let _p = self.permit("get", key).await?;
        self.timed("get", key, async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .send()
                .await
                .map_err(|e| classify("get", key, e))?;
            let data = out
                .body
                .collect()
                .await
                .map_err(|e| StoreError::unavailable("get", key, e))?;
            Ok(data.into_bytes())
        })
        .await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let _p = self.permit("get_range", key).await?;
        let data = self
            .timed("get_range", key, async {
                let out = self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(self.full(key))
                    .range(format!("bytes={offset}-{}", offset + len - 1))
                    .send()
                    .await
                    .map_err(|e| classify("get_range", key, e))?;
                out.body
                    .collect()
                    .await
                    .map_err(|e| StoreError::unavailable("get_range", key, e))
                    .map(aws_sdk_s3::primitives::AggregatedBytes::into_bytes)
            })
            .await?;
        if data.len() as u64 != len {
            return Err(StoreError::Rejected {
                op: "get_range",
                key: key.to_owned(),
                message: "object shorter than requested range".into(),
            });
        }
        Ok(data)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let _p = self.permit("head", key).await?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectInfo {
                key: key.to_owned(),
                size: out
                    .content_length()
                    .and_then(|l| u64::try_from(l).ok())
                    .unwrap_or(0),
                modified: out
                    .last_modified()
                    .and_then(|d| SystemTime::try_from(*d).ok())
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            })),
            Err(e) => match classify("head", key, e) {
                StoreError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.list_after(prefix, "").await
    }

    async fn list_after(
        &self,
        prefix: &str,
        start_after: &str,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let start = (!start_after.is_empty()).then(|| self.full(start_after));
        loop {
            let _p = self.permit("list", prefix).await?;
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full(prefix))
                .set_start_after(if token.is_none() { start.clone() } else { None })
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify("list", prefix, e))?;
            out.extend(page.contents().iter().filter_map(|o| self.info(o)));
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
    ) -> Result<(Vec<ObjectInfo>, bool), StoreError> {
        let _p = self.permit("list", prefix).await?;
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full(prefix))
            .set_start_after((!start_after.is_empty()).then(|| self.full(start_after)))
            .max_keys(i32::try_from(limit.min(1000)).unwrap_or(1000))
            .send()
            .await
            .map_err(|e| classify("list", prefix, e))?;
        let out = page
            .contents()
            .iter()
            .filter_map(|o| self.info(o))
            .collect();
        Ok((out, page.is_truncated() == Some(true)))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _p = self.permit("delete", key).await?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match classify("delete", key, e) {
                StoreError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _p = self.permit("ping", &self.bucket).await?;
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| classify("ping", &self.bucket, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_credentials() {
        let s = S3Settings {
            endpoint: "http://127.0.0.1:1".into(),
            region: "us-east-1".into(),
            bucket: "b".into(),
            prefix: String::new(),
            path_style: true,
            auth: S3Auth::Keys {
                access_key_id: "AKIDEXAMPLEKEYID".into(),
                secret_access_key: "wJalrXUtnFEMI-secret".into(),
            },
            max_concurrency: 1,
            request_timeout: Duration::from_secs(1),
        };
        let text = format!("{s:?}");
        assert!(!text.contains("wJalrXUtnFEMI-secret"), "{text}");
        assert!(!text.contains("AKIDEXAMPLEKEYID"), "{text}");
    }
}
