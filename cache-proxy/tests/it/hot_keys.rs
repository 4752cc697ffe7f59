//! A hot key: many jobs write `cache.zip` of one key at once. GCS allows one write per second per
//! object name and answers 429 to the rest; the proxy's manifest writes must retry with backoff so
//! that every PUT succeeds and the last one wins. The backend here is s3s-fs behind a front that
//! answers 429 `SlowDown` to a second write of one name within a second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use spotrun_cache_proxy::config::StoreChoice;
use spotrun_cache_proxy::store::s3::{S3Auth, S3Settings};
use spotrun_testkit::logcapture::register_secret;
use spotrun_testkit::s3peer::S3Peer;

use crate::common::{BUCKET, Backend, Proxy, get_body, noise, sha256};

struct Front {
    upstream: String,
    client: Client<HttpConnector, Body>,
    last_write: Mutex<HashMap<String, Instant>>,
    throttled: Mutex<u32>,
}

async fn throttling_front(State(f): State<Arc<Front>>, req: Request<Body>) -> Response {
    if req.method() == Method::PUT {
        let path = req.uri().path().to_owned();
        let mut last = f.last_write.lock().unwrap();
        if last
            .get(&path)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            *f.throttled.lock().unwrap() += 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>The object exceeded the rate limit for object mutation operations.</Message></Error>",
            )
                .into_response();
        }
        last.insert(path, Instant::now());
    }
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("{}{path}", f.upstream).parse().unwrap();
    match f.client.request(Request::from_parts(parts, body)).await {
        Ok(res) => res.map(Body::new),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_one_key_through_a_throttling_backend_all_succeed_and_the_last_wins() {
    let peer = S3Peer::start(&["hot"]).expect("s3s-fs must be installed");
    register_secret(&peer.secret_key);
    let front = Arc::new(Front {
        upstream: peer.endpoint(),
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        last_write: Mutex::new(HashMap::new()),
        throttled: Mutex::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .fallback(throttling_front)
        .with_state(front.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let (ak, sk) = (peer.access_key.clone(), peer.secret_key.clone());
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.store = StoreChoice::S3(S3Settings {
            endpoint: format!("http://{front_addr}"),
            region: "us-east-1".into(),
            bucket: "hot".into(),
            prefix: String::new(),
            path_style: true,
            auth: S3Auth::Keys {
                access_key_id: ak,
                secret_access_key: sk,
            },
            max_concurrency: 8,
            request_timeout: Duration::from_secs(10),
        });
    })
    .await;
    let key = "project/1/main-protected/cache.zip";
    let bodies: Vec<Vec<u8>> = (0..4).map(|i| noise(300_000, 60 + i)).collect();
    let mut puts = Vec::new();
    for b in &bodies {
        let (client, b) = (proxy.client(), b.clone());
        puts.push(tokio::spawn(async move {
            client
                .put_object()
                .bucket(BUCKET)
                .key(key)
                .body(b.into())
                .send()
                .await
        }));
    }
    for p in puts {
        p.await.unwrap().expect("every concurrent PUT succeeds");
    }
    assert!(
        *front.throttled.lock().unwrap() > 0,
        "the backend throttled some manifest writes"
    );
    let got = sha256(&get_body(&proxy, key).await);
    assert!(bodies.iter().any(|b| sha256(b) == got), "one whole version");
    // Once the backend's window passed, a later PUT is what reads return.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    proxy
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(bodies[2].clone().into())
        .send()
        .await
        .unwrap();
    assert_eq!(sha256(&get_body(&proxy, key).await), sha256(&bodies[2]));
    proxy.stop().await;
    server.abort();
    let _ = server.await;
}
