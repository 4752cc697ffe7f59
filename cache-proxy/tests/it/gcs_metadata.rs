//! GCS without HMAC keys (GKE Workload Identity): the proxy takes OAuth tokens from the metadata
//! server and sends them as `Authorization: Bearer`, never a signature.
//!
//! Peers, all on loopback: a fake metadata server (the token endpoint, `Metadata-Flavor: Google`
//! required), a "GCS front" that admits only requests bearing a token the metadata server issued
//! and not revoked (and counts any `SigV4` attempt), forwarding to an anonymous s3s-fs.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use spotrun_cache_proxy::config::StoreChoice;
use spotrun_cache_proxy::store::s3::{S3Auth, S3Settings};
use spotrun_testkit::logcapture::register_secret;
use spotrun_testkit::s3peer::S3Peer;

use crate::common::{BUCKET, Backend, Proxy, get_body, noise, presign, raw, sha256};

#[derive(Default)]
struct Tokens {
    /// Issued and not revoked.
    valid: HashSet<String>,
    /// The next answers: (token, `expires_in`).
    next: Vec<(String, u64)>,
    fetches: u32,
    without_flavor: u32,
    /// Answer 500 instead of a token.
    down: bool,
    /// Requests that reached the GCS front with a valid bearer token / anything else.
    admitted: u32,
    refused: u32,
    sigv4_seen: u32,
}

type Shared = Arc<Mutex<Tokens>>;

async fn metadata(State(t): State<Shared>, headers: HeaderMap, req: Request<Body>) -> Response {
    let mut t = t.lock().unwrap();
    if req.uri().path() != "/computeMetadata/v1/instance/service-accounts/default/token" {
        return StatusCode::NOT_FOUND.into_response();
    }
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        t.without_flavor += 1;
        return StatusCode::FORBIDDEN.into_response();
    }
    if t.down {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    t.fetches += 1;
    let (token, expires_in) = if t.next.is_empty() {
        (format!("ya29.test-token-{}", t.fetches), 3600)
    } else {
        t.next.remove(0)
    };
    register_secret(&token);
    t.valid.insert(token.clone());
    axum::Json(serde_json::json!({
        "access_token": token, "expires_in": expires_in, "token_type": "Bearer"
    }))
    .into_response()
}

struct Front {
    state: Shared,
    upstream: String,
    client: Client<HttpConnector, Body>,
}

async fn gcs_front(State(f): State<Arc<Front>>, req: Request<Body>) -> Response {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    {
        let mut t = f.state.lock().unwrap();
        if auth.starts_with("AWS4-HMAC-SHA256")
            || req
                .uri()
                .query()
                .is_some_and(|q| q.contains("X-Amz-Signature"))
        {
            t.sigv4_seen += 1;
        }
        let ok = auth
            .strip_prefix("Bearer ")
            .is_some_and(|tok| t.valid.contains(tok));
        if !ok {
            t.refused += 1;
            return (
                StatusCode::UNAUTHORIZED,
                "<?xml version='1.0' encoding='UTF-8'?><Error><Code>AuthenticationRequired</Code><Message>Authentication required.</Message></Error>",
            )
                .into_response();
        }
        t.admitted += 1;
    }
    let (mut parts, body) = req.into_parts();
    parts.headers.remove("authorization");
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("{}{path}", f.upstream).parse().unwrap();
    match f.client.request(Request::from_parts(parts, body)).await {
        Ok(res) => res.map(Body::new),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

struct Gcs {
    state: Shared,
    proxy: Proxy,
    _peer: S3Peer,
}

async fn start(first: Vec<(String, u64)>) -> Gcs {
    let state: Shared = Arc::new(Mutex::new(Tokens {
        next: first,
        ..Tokens::default()
    }));
    let meta = serve(
        axum::Router::new()
            .fallback(metadata)
            .with_state(state.clone()),
    )
    .await;
    let peer = S3Peer::start_anonymous(&["gcs-bucket"]).expect("s3s-fs must be installed");
    let front = Arc::new(Front {
        state: state.clone(),
        upstream: peer.endpoint(),
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
    });
    let front_addr = serve(axum::Router::new().fallback(gcs_front).with_state(front)).await;
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.store = StoreChoice::S3(S3Settings {
            endpoint: format!("http://{front_addr}"),
            region: "auto".into(),
            bucket: "gcs-bucket".into(),
            prefix: "spotrun/".into(),
            path_style: true,
            auth: S3Auth::GceMetadata {
                host: Some(meta.to_string()),
            },
            max_concurrency: 4,
            request_timeout: Duration::from_secs(10),
        });
    })
    .await;
    Gcs {
        state,
        proxy,
        _peer: peer,
    }
}

/// Uploads and downloads through the proxy with only metadata-server tokens: every backend request
/// bears the token, none is signed, one token fetch serves them all.
#[tokio::test]
async fn gcs_with_metadata_server_tokens_round_trips_without_keys() {
    let g = start(Vec::new()).await;
    let client = g.proxy.client();
    let body = noise(3 << 20, 41);
    client
        .put_object()
        .bucket(BUCKET)
        .key("project/1/main-1/cache.zip")
        .body(body.clone().into())
        .send()
        .await
        .expect("PUT through a bearer-token backend");
    let got = get_body(&g.proxy, "project/1/main-1/cache.zip").await;
    assert_eq!(sha256(&got), sha256(&body));
    {
        let t = g.state.lock().unwrap();
        assert_eq!(t.sigv4_seen, 0, "no request may be signed with keys");
        assert_eq!(t.refused, 0, "every backend request carried a valid token");
        assert!(
            t.admitted >= 3,
            "manifest, pack and reads went through: {}",
            t.admitted
        );
        assert_eq!(t.fetches, 1, "the token is cached");
        assert_eq!(
            t.without_flavor, 0,
            "Metadata-Flavor: Google is always sent"
        );
    }
    g.proxy.stop().await;
}

/// A token close to expiry is replaced before use; the old one can then be revoked.
#[tokio::test]
async fn gcs_token_is_refreshed_before_it_expires() {
    // 305 s: "fresh" (more than the 300 s refresh margin left) for the first 5 s only, which
    // leaves a loaded machine room to make the first request with it.
    let g = start(vec![("ya29.short-lived".into(), 305)]).await;
    let client = g.proxy.client();
    client
        .put_object()
        .bucket(BUCKET)
        .key("k1")
        .body(b"first".to_vec().into())
        .send()
        .await
        .unwrap();
    assert_eq!(g.state.lock().unwrap().fetches, 1);
    tokio::time::sleep(Duration::from_millis(5500)).await;
    // From now on only the next token opens the bucket.
    g.state.lock().unwrap().valid.remove("ya29.short-lived");
    client
        .put_object()
        .bucket(BUCKET)
        .key("k2")
        .body(b"second".to_vec().into())
        .send()
        .await
        .expect("a refreshed token");
    {
        let t = g.state.lock().unwrap();
        assert_eq!(t.fetches, 2, "refreshed once");
        assert_eq!(
            t.refused, 0,
            "the expiring token was never used after the refresh"
        );
    }
    g.proxy.stop().await;
}

/// Metadata server trouble is a retryable 503 `SlowDown` for the client, stores nothing, and
/// passes once the server answers again.
#[tokio::test]
async fn gcs_metadata_server_down_is_503_slowdown_then_recovers() {
    let g = start(vec![("ya29.expiring".into(), 305)]).await;
    let client = g.proxy.client();
    client
        .put_object()
        .bucket(BUCKET)
        .key("warm")
        .body(b"warm".to_vec().into())
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5500)).await;
    g.state.lock().unwrap().down = true;
    let body = noise(256 << 10, 5);
    let (put, _) = presign(&client, "PUT", "k-down", None).await;
    let r = raw(g.proxy.addr, "PUT", &put, &[], &body).await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "SlowDown"));
    assert!(r.header("retry-after").is_some());
    g.state.lock().unwrap().down = false;
    let (head, _) = presign(&client, "HEAD", "k-down", None).await;
    assert_eq!(raw(g.proxy.addr, "HEAD", &head, &[], &[]).await.status, 404);
    let r = raw(g.proxy.addr, "PUT", &put, &[], &body).await;
    assert_eq!(r.status, 200, "service resumes with a new token");
    let (get, _) = presign(&client, "GET", "k-down", None).await;
    let got = raw(g.proxy.addr, "GET", &get, &[], &[]).await;
    assert_eq!(sha256(&got.body), sha256(&body));
    assert_eq!(g.state.lock().unwrap().sigv4_seen, 0);
    g.proxy.stop().await;
}
