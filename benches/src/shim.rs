//! A counting HTTP reverse proxy in front of the S3 backend: every request the backend receives
//! through it is counted by method (issue 7 P10: backend requests per GiB uploaded), and direct
//! PUTs through it measure what a bare pass-through hop costs (the P1 row's forwarder).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Requests seen, by method.
#[derive(Debug, Default)]
pub struct Counts {
    pub put: AtomicU64,
    pub get: AtomicU64,
    pub head: AtomicU64,
    pub other: AtomicU64,
}

impl Counts {
    #[must_use]
    pub fn total(&self) -> u64 {
        [&self.put, &self.get, &self.head, &self.other]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// The running shim; stops when dropped.
#[derive(Debug)]
pub struct CountingShim {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingShim {
    /// Listen on a free loopback port and forward everything to `upstream` (the `Host` header, and
    /// with it the `SigV4` signature, passes through unchanged).
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        let c = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (client, counts) = (client.clone(), c.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |mut req: hyper::Request<Incoming>| {
                        let (client, counts) = (client.clone(), counts.clone());
                        async move {
                            let counter = match *req.method() {
                                hyper::Method::PUT => &counts.put,
                                hyper::Method::GET => &counts.get,
                                hyper::Method::HEAD => &counts.head,
                                _ => &counts.other,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            let pq = req
                                .uri()
                                .path_and_query()
                                .map_or("/", hyper::http::uri::PathAndQuery::as_str)
                                .to_owned();
                            *req.uri_mut() = format!("http://{upstream}{pq}")
                                .parse()
                                .expect("a valid upstream URI");
                            client.request(req).await
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, counts, task })
    }
}

impl Drop for CountingShim {
    fn drop(&mut self) {
        self.task.abort();
    }
}
