//! Kubernetes API access with bounded, jittered retries and per-call timeouts.

use std::future::Future;
use std::time::Duration;

use kube::Client;
use rand::Rng as _;
use serde_json::json;

use crate::events::Events;
use crate::failure::Failure;
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{call}: {source}")]
    Api {
        call: String,
        #[source]
        source: kube::Error,
    },
    #[error("{call}: no answer within {secs} s")]
    Timeout { call: String, secs: u64 },
    #[error("connecting to the Kubernetes API: {0}")]
    Connect(#[source] kube::Error),
}

impl KubeError {
    /// The API status, when the server answered with one.
    #[must_use]
    pub fn status(&self) -> Option<&kube::core::Status> {
        match self {
            Self::Api {
                source: kube::Error::Api(s),
                ..
            } => Some(s),
            _ => None,
        }
    }

    #[must_use]
    pub fn is_not_found(&self) -> bool {
        self.status().is_some_and(kube::core::Status::is_not_found)
    }

    #[must_use]
    pub fn is_already_exists(&self) -> bool {
        self.status()
            .is_some_and(|s| s.is_already_exists() || s.code == 409 && s.reason == "AlreadyExists")
    }

    #[must_use]
    pub fn is_conflict(&self) -> bool {
        self.status().is_some_and(kube::core::Status::is_conflict)
    }
}

/// Any API error that reaches a subcommand's top is a system failure: the job is not at fault.
impl From<KubeError> for Failure {
    fn from(e: KubeError) -> Self {
        Failure::System(format!("Kubernetes API: {e}"))
    }
}

/// Whether an error is worth retrying, and the server's requested delay.
///
/// 429 and 5xx gateways are transient by definition (the apiserver sheds load or restarts);
/// connection-level errors (reset, refused, TLS, http2 lost) mean the request may not have been
/// processed. 4xx other than 429 are answers: retrying cannot change them.
#[must_use]
pub fn retryable(err: &kube::Error) -> (bool, Option<Duration>) {
    match err {
        kube::Error::Api(s) => {
            let retry_after = s
                .details
                .as_ref()
                .map(|d| d.retry_after_seconds)
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(u64::from(s)));
            (
                matches!(s.code, 429 | 500 | 502 | 503 | 504) || s.reason == "TooManyRequests",
                retry_after,
            )
        }
        // A body that failed to parse is usually a truncated response from a dying connection.
        kube::Error::HyperError(_)
        | kube::Error::Service(_)
        | kube::Error::ReadEvents(_)
        | kube::Error::HttpError(_)
        | kube::Error::SerdeError(_) => (true, None),
        _ => (false, None),
    }
}

/// Exponential backoff with jitter in [d/2, d], capped; honours a server delay up to the cap ×4.
#[must_use]
pub fn backoff(attempt: u32, base_ms: u64, max_ms: u64, retry_after: Option<Duration>) -> Duration {
    let exp = base_ms
        .saturating_mul(1u64 << attempt.min(16))
        .min(max_ms)
        .max(1);
    let jittered = rand::rng().random_range(exp / 2..=exp);
    let d = Duration::from_millis(jittered);
    match retry_after {
        Some(ra) => d.max(ra.min(Duration::from_millis(max_ms.saturating_mul(4)))),
        None => d,
    }
}

/// The client plus what every call needs.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    pub namespace: String,
    pub events: Events,
    retry_limit: u32,
    base_ms: u64,
    max_ms: u64,
    call_timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// kube-rs's default client stack (base URI, auth, extra headers, timeouts, rustls) with two
/// changes: `TCP_NODELAY` on every connection, and no TLS set-up for a plain `http://` server.
///
/// An exec that uploads a script sends its stdin frame and the stdin-close frame back to back;
/// with Nagle's algorithm on (kube-rs's connector leaves it on) the kernel holds the second small
/// segment until the server's delayed ACK, about 40 ms per stage. Without a CA in the kubeconfig
/// rustls loads every system root certificate (~10 ms per invocation), which a plain-HTTP server
/// never needs. `Retry-After` is folded into errors by [`crate::retry_after`].
pub fn build_client(config: &kube::Config) -> Result<kube::Client, kube::Error> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt as _;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    if config.cluster_url.scheme() == Some(&http::uri::Scheme::HTTP) && config.proxy_url.is_none() {
        finish_client(config, http)
    } else if config.proxy_url.is_some() {
        // Proxies are rare for the executor; kube-rs's own stack handles every proxy kind.
        Ok(kube::client::ClientBuilder::try_from(config.clone())?
            .with_layer(&crate::retry_after::RetryAfterLayer)
            .build())
    } else {
        let https = config.rustls_https_connector_with_connector(http)?;
        finish_client(config, https)
    }
}

fn finish_client<H>(config: &kube::Config, connector: H) -> Result<kube::Client, kube::Error>
where
    H: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
    H::Response: hyper_util::client::legacy::connect::Connection
        + hyper::rt::Read
        + hyper::rt::Write
        + Send
        + Unpin
        + 'static,
    H::Future: Send + 'static,
    H::Error: Into<BoxError>,
{
    use kube::client::ConfigExt as _;
    use tower::ServiceExt as _;
    let mut connector = hyper_timeout::TimeoutConnector::new(connector);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let service = tower::ServiceBuilder::new()
        .layer(crate::retry_after::RetryAfterLayer)
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .service(client.map_err(BoxError::from).map_response(
            |res: http::Response<hyper::body::Incoming>| {
                res.map(|body| {
                    Box::new(http_body_util::BodyExt::map_err(body, BoxError::from))
                        as Box<kube::client::DynBody>
                })
            },
        ));
    Ok(kube::client::ClientBuilder::new(service, config.default_namespace.clone()).build())
}

impl Kube {
    pub async fn connect(settings: &Settings, events: Events) -> Result<Self, KubeError> {
        let config = kube::Config::infer()
            .await
            .map_err(|e| KubeError::Connect(kube::Error::InferConfig(e)))?;
        let client = build_client(&config).map_err(KubeError::Connect)?;
        Ok(Self {
            client,
            namespace: settings.namespace.clone(),
            events,
            retry_limit: settings.api.retry_limit,
            base_ms: settings.api.retry_backoff_base_ms,
            max_ms: settings.api.retry_backoff_max_ms,
            call_timeout: Duration::from_secs(settings.timeouts.api_call_seconds),
        })
    }

    /// Runs `f` with retries on transient errors; every retry is an `api_retry` event.
    pub async fn call<T, F, Fut>(&self, call: &str, f: F) -> Result<T, KubeError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut attempt = 0u32;
        loop {
            let (err, retry, after) = match tokio::time::timeout(self.call_timeout, f()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let (retry, after) = retryable(&e);
                    (
                        KubeError::Api {
                            call: call.to_string(),
                            source: e,
                        },
                        retry,
                        after,
                    )
                }
                Err(_) => (
                    KubeError::Timeout {
                        call: call.to_string(),
                        secs: self.call_timeout.as_secs(),
                    },
                    true,
                    None,
                ),
            };
            if !retry || attempt >= self.retry_limit {
                return Err(err);
            }
            let delay = backoff(attempt, self.base_ms, self.max_ms, after);
            attempt += 1;
            self.events.warn(
                "api_retry",
                json!({ "call": call, "attempt": attempt, "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "error": err.to_string() }),
            );
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS apiserver (a self-signed certificate made with `openssl`, as GKE's kubeconfig carries
    /// its cluster CA): `build_client` verifies the server against the kubeconfig's CA and talks
    /// to it; without that CA the handshake is refused (verification is on).
    #[tokio::test]
    async fn build_client_speaks_tls_with_the_kubeconfig_ca() {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=kube-apiserver"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl (installed by .ci/install)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cert_der = CertificateDer::from_pem_file(&cert).unwrap();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert_der.clone()],
                PrivateKeyDer::from_pem_file(&key).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let body = if req.uri().path() == "/api/v1/namespaces/ci/pods/p1" {
                                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p1","namespace":"ci"}}"#
                            } else {
                                r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                    .unwrap(),
                            )
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let mut config = kube::Config::new(format!("https://{addr}").parse().unwrap());
        config.default_namespace = "ci".into();
        config.root_cert = Some(vec![cert_der.to_vec()]);
        let client = build_client(&config).unwrap();
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "ci");
        let pod = pods.get("p1").await.expect("GET over TLS");
        assert_eq!(pod.metadata.name.as_deref(), Some("p1"));

        config.root_cert = None;
        let untrusted = build_client(&config).unwrap();
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(untrusted, "ci");
        let err = pods
            .get("p1")
            .await
            .expect_err("a self-signed server is not trusted without its CA");
        assert!(
            format!("{err:?}").to_lowercase().contains("cert"),
            "{err:?}"
        );
    }

    fn status(code: u16, reason: &str, retry_after: u32) -> kube::Error {
        let mut s = kube::core::Status::failure("x", reason).with_code(code);
        if retry_after > 0 {
            s = s.with_details(
                serde_json::from_value(serde_json::json!({ "retryAfterSeconds": retry_after }))
                    .unwrap(),
            );
        }
        kube::Error::Api(s.boxed())
    }

    #[test]
    fn classification() {
        for code in [429, 500, 502, 503, 504] {
            assert!(retryable(&status(code, "", 0)).0, "{code}");
        }
        for code in [400, 403, 404, 409, 410, 422] {
            assert!(!retryable(&status(code, "", 0)).0, "{code}");
        }
        assert_eq!(
            retryable(&status(429, "TooManyRequests", 3)).1,
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn backoff_is_bounded_jittered_and_honours_retry_after() {
        for attempt in 0..20 {
            let d = backoff(attempt, 100, 3000, None);
            let cap = (100u64 << attempt.min(16)).min(3000);
            assert!(
                d >= Duration::from_millis(cap / 2) && d <= Duration::from_millis(cap),
                "{attempt}: {d:?}"
            );
        }
        assert!(backoff(0, 100, 3000, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        assert!(backoff(0, 100, 1000, Some(Duration::from_mins(1))) <= Duration::from_secs(4));
    }
}
