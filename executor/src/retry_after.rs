//! Carries the HTTP `Retry-After` header into the error kube-rs hands us.
//!
//! kube-rs turns an error response into a `Status` parsed from the body and drops the headers. The
//! apiserver's priority-and-fairness filter answers 429 with `Retry-After: N` and a plain-text body
//! (no `Status`, so no `details.retryAfterSeconds`), and proxies in front of it do the same for 503.
//! This layer rewrites such responses (only error responses carrying the header) so that the
//! `Status` kube-rs builds has `details.retryAfterSeconds`, which `kubeapi::retryable` honours.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use kube::client::DynBody;
use serde_json::{Value, json};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, Default)]
pub struct RetryAfterLayer;

impl<S> tower::Layer<S> for RetryAfterLayer {
    type Service = RetryAfter<S>;
    fn layer(&self, inner: S) -> RetryAfter<S> {
        RetryAfter(inner)
    }
}

#[derive(Debug, Clone)]
pub struct RetryAfter<S>(S);

impl<S, B> tower::Service<Request<B>> for RetryAfter<S>
where
    S: tower::Service<Request<B>, Response = Response<Box<DynBody>>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = Response<Box<DynBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let res = fut.await.map_err(Into::into)?;
            let Some(secs) = retry_after_seconds(&res) else {
                return Ok(res);
            };
            let (mut parts, body) = res.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let rewritten = with_retry_after(&bytes, parts.status, secs);
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            let body: Box<DynBody> = Box::new(
                Full::new(Bytes::from(rewritten))
                    .map_err(|never: std::convert::Infallible| -> BoxError { match never {} }),
            );
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// Delay asked for by an error response (delta-seconds or an HTTP date), if any.
fn retry_after_seconds<B>(res: &Response<B>) -> Option<u32> {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let v = res
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u32>() {
        return Some(secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let secs = at
        .duration_since(SystemTime::now())
        .map_or(0, |d| d.as_secs());
    Some(u32::try_from(secs).unwrap_or(u32::MAX))
}

/// The body as a `Status` with `details.retryAfterSeconds` set (a non-`Status` body becomes the
/// message of a new `Status`, as kube-rs would have done, plus the delay).
fn with_retry_after(body: &[u8], code: StatusCode, secs: u32) -> Vec<u8> {
    if let Ok(Value::Object(mut status)) = serde_json::from_slice::<Value>(body)
        && status.get("kind").and_then(Value::as_str) == Some("Status")
    {
        let details = status.entry("details").or_insert_with(|| json!({}));
        if let Value::Object(d) = details
            && d.get("retryAfterSeconds")
                .and_then(Value::as_u64)
                .is_none_or(|s| s == 0)
        {
            d.insert("retryAfterSeconds".into(), secs.into());
        }
        return Value::Object(status).to_string().into_bytes();
    }
    let reason = match code {
        StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        _ => "",
    };
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": String::from_utf8_lossy(body).trim(),
        "reason": reason,
        "details": {"retryAfterSeconds": secs},
        "code": code.as_u16(),
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    /// An apiserver that answers every request like priority-and-fairness under load.
    #[derive(Clone)]
    struct Overloaded {
        body: &'static str,
        retry_after: &'static str,
    }

    impl tower::Service<Request<kube::client::Body>> for Overloaded {
        type Response = Response<Box<DynBody>>;
        type Error = BoxError;
        type Future =
            Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send + 'static>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<kube::client::Body>) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let body: Box<DynBody> = Box::new(
                    Full::new(Bytes::from_static(this.body.as_bytes()))
                        .map_err(|never: std::convert::Infallible| -> BoxError { match never {} }),
                );
                Ok(Response::builder()
                    .status(429)
                    .header("retry-after", this.retry_after)
                    .header("content-type", "text/plain; charset=utf-8")
                    .body(body)
                    .unwrap())
            })
        }
    }

    async fn error_through_kube(service: Overloaded, layered: bool) -> kube::Error {
        let client = if layered {
            kube::client::ClientBuilder::new(service, "default")
                .with_layer(&RetryAfterLayer)
                .build()
        } else {
            kube::client::ClientBuilder::new(service, "default").build()
        };
        let pods: kube::Api<Pod> = kube::Api::namespaced(client, "default");
        pods.get("p").await.unwrap_err()
    }

    #[tokio::test]
    async fn plain_text_429_with_header_reaches_the_retry_decision() {
        let apf = Overloaded {
            body: "Too many requests, please try again later.\n",
            retry_after: "3",
        };
        let (retry, after) =
            crate::kubeapi::retryable(&error_through_kube(apf.clone(), true).await);
        assert!(retry);
        assert_eq!(after, Some(std::time::Duration::from_secs(3)));
        // Without the layer kube-rs loses the header: the test would catch a removed layer.
        let (_, lost) = crate::kubeapi::retryable(&error_through_kube(apf, false).await);
        assert_eq!(lost, None);
    }

    #[tokio::test]
    async fn status_bodies_keep_their_fields_and_gain_the_delay() {
        let svc = Overloaded {
            body: r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"slow down","reason":"TooManyRequests","code":429}"#,
            retry_after: "7",
        };
        let err = error_through_kube(svc, true).await;
        let kube::Error::Api(status) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(status.message, "slow down");
        assert_eq!(status.reason, "TooManyRequests");
        assert_eq!(
            crate::kubeapi::retryable(&err).1,
            Some(std::time::Duration::from_secs(7))
        );
    }

    #[test]
    fn http_dates_and_garbage() {
        let future =
            httpdate::fmt_http_date(SystemTime::now() + std::time::Duration::from_secs(60));
        let res = Response::builder()
            .status(503)
            .header("retry-after", future)
            .body(())
            .unwrap();
        let secs = retry_after_seconds(&res).unwrap();
        assert!((58..=60).contains(&secs), "{secs}");
        let res = Response::builder()
            .status(503)
            .header("retry-after", "soon")
            .body(())
            .unwrap();
        assert_eq!(retry_after_seconds(&res), None);
        let ok = Response::builder()
            .status(200)
            .header("retry-after", "5")
            .body(())
            .unwrap();
        assert_eq!(
            retry_after_seconds(&ok),
            None,
            "success responses pass untouched"
        );
    }
}
