//! OAuth access tokens from the GCE/GKE metadata server, for GCS without HMAC keys.
//!
//! On GKE with Workload Identity (or on a node's own service account) a pod asks the metadata
//! server for a short-lived token:
//! `GET http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token`
//! with `Metadata-Flavor: Google`, answered by `{"access_token", "expires_in", "token_type"}`.
//! The GCS XML API (the S3-compatible endpoint the proxy talks to) accepts it as
//! `Authorization: Bearer <token>` instead of a signature. `GCE_METADATA_HOST` overrides the host
//! (the variable Google's client libraries honour; tests point it at loopback).
//!
//! The token is cached and refreshed [`REFRESH_BEFORE`] ahead of its expiry, before a backend call
//! (async, in `S3Store::timed`); the request interceptor, which must be synchronous, only reads the
//! cache. Tokens never reach a log: `Debug` prints only the host.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Refresh this long before the token expires (Google hands out tokens valid for ~1 h and renews
/// them in the last 5 minutes).
pub const REFRESH_BEFORE: Duration = Duration::from_secs(300);
const DEFAULT_HOST: &str = "metadata.google.internal";
const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// The metadata server's answer.
#[derive(serde::Deserialize)]
struct Answer {
    access_token: String,
    expires_in: u64,
    token_type: String,
}

#[derive(Clone)]
struct Token {
    value: String,
    expires: Instant,
}

/// A cached metadata-server token, shared by the store and its interceptor.
#[derive(Clone)]
pub struct MetadataToken {
    host: String,
    cache: Arc<Mutex<Option<Token>>>,
    refresh: Arc<tokio::sync::Mutex<()>>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl std::fmt::Debug for MetadataToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataToken")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("metadata server {host}: {msg}")]
    Fetch { host: String, msg: String },
}

impl MetadataToken {
    /// `host` as `name[:port]`; `None` reads `GCE_METADATA_HOST`, else the GKE default.
    #[must_use]
    pub fn new(host: Option<String>) -> Self {
        let host = host
            .or_else(|| std::env::var("GCE_METADATA_HOST").ok())
            .filter(|h| !h.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_HOST.to_string());
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        Self {
            host,
            cache: Arc::new(Mutex::new(None)),
            refresh: Arc::new(tokio::sync::Mutex::new(())),
            client: Client::builder(TokioExecutor::new()).build(http),
        }
    }

    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The cached token if it stays valid for at least `margin`.
    fn cached(&self, margin: Duration) -> Option<String> {
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache
            .as_ref()
            .filter(|t| t.expires > Instant::now() + margin)
            .map(|t| t.value.clone())
    }

    /// Makes sure a token valid for at least [`REFRESH_BEFORE`] is cached.
    ///
    /// # Errors
    /// The metadata server is unreachable, answers non-200, or with something that is not a token.
    pub async fn ensure(&self) -> Result<(), TokenError> {
        if self.cached(REFRESH_BEFORE).is_some() {
            return Ok(());
        }
        let _one_at_a_time = self.refresh.lock().await;
        if self.cached(REFRESH_BEFORE).is_some() {
            return Ok(());
        }
        let token = self.fetch().await?;
        *self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token);
        Ok(())
    }

    async fn fetch(&self) -> Result<Token, TokenError> {
        let err = |msg: String| TokenError::Fetch {
            host: self.host.clone(),
            msg,
        };
        let req = http::Request::get(format!("http://{}{TOKEN_PATH}", self.host))
            .header("Metadata-Flavor", "Google")
            .body(Empty::new())
            .map_err(|e| err(format!("building the request: {e}")))?;
        let started = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(10), async {
            let res = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        })
        .await
        .map_err(|_| err("no answer within 10 s".into()))?
        .map_err(err)?;
        let (status, body) = res;
        if status != http::StatusCode::OK {
            return Err(err(format!("HTTP {status} for the access token")));
        }
        let a: Answer = serde_json::from_slice(&body)
            .map_err(|e| err(format!("token answer is not the expected JSON: {e}")))?;
        if !a.token_type.eq_ignore_ascii_case("bearer") || a.access_token.is_empty() {
            return Err(err(format!(
                "unexpected token type {:?} (or an empty token)",
                a.token_type
            )));
        }
        if a.access_token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err(err(
                "the token holds characters a header cannot carry".into()
            ));
        }
        tracing::info!(
            host = %self.host,
            expires_in_secs = a.expires_in,
            "fetched a GCS access token from the metadata server"
        );
        Ok(Token {
            value: a.access_token,
            expires: started + Duration::from_secs(a.expires_in),
        })
    }
}

/// Puts `Authorization: Bearer <token>` on every backend request (the SDK signs nothing).
#[derive(Debug)]
pub struct BearerInterceptor(pub MetadataToken);

impl Intercept for BearerInterceptor {
    fn name(&self) -> &'static str {
        "spotrun-gcs-bearer"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let token = self.0.cached(Duration::ZERO).ok_or_else(|| {
            format!(
                "no valid access token from the metadata server {}",
                self.0.host
            )
        })?;
        context
            .request_mut()
            .headers_mut()
            .insert("authorization", format!("Bearer {token}"));
        Ok(())
    }
}
