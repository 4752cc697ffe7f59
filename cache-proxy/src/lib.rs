//! spotrun cache proxy: an S3-compatible endpoint for gitlab-runner's cache that stores bodies deduplicated.

pub mod auth;
pub mod bodyrate;
pub mod chunked;
pub mod config;
pub mod conn;
pub mod dedup;
pub mod digests;
pub mod metrics;
pub mod ops;
pub mod s3api;
pub mod s3error;
pub mod server;
pub mod sigv4;
pub mod store;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use config::{Settings, StoreChoice};
use dedup::{DedupError, DedupStore, GcOptions};
use metrics::Metrics;
use store::BlobStore;

/// Failures of the program's phases, for `main` to report.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("opening the store: {0}")]
    Store(#[from] store::StoreError),
    #[error("loading the dedup index: {0}")]
    Dedup(#[from] DedupError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Build the configured backend.
pub fn open_blob_store(choice: &StoreChoice) -> Result<Arc<dyn BlobStore>, store::StoreError> {
    Ok(match choice {
        StoreChoice::Disk(dir) => Arc::new(store::disk::DiskStore::open(dir)?),
        StoreChoice::S3(s) => Arc::new(store::s3::S3Store::new(s)),
    })
}

/// Open the dedup store for `settings`.
pub async fn open_dedup(
    settings: &Settings,
    metrics: Arc<Metrics>,
) -> Result<Arc<DedupStore>, RunError> {
    let blob = open_blob_store(&settings.store)?;
    Ok(Arc::new(
        DedupStore::open(blob, settings.spool_dir.clone(), metrics).await?,
    ))
}

/// Open the dedup store for `gc` and `stats`, which may run beside a server on the same spool.
pub fn open_dedup_for_maintenance(
    settings: &Settings,
    metrics: Arc<Metrics>,
) -> Result<Arc<DedupStore>, RunError> {
    let blob = open_blob_store(&settings.store)?;
    Ok(Arc::new(DedupStore::open_for_maintenance(
        blob,
        settings.spool_dir.clone(),
        metrics,
    )?))
}

#[must_use]
pub fn gc_options(settings: &Settings) -> GcOptions {
    GcOptions {
        grace: settings.gc_grace,
        expire_unread: settings.expire_unread,
        max_logical_bytes: settings.max_logical_bytes,
        expire_uploads: settings.expire_uploads,
        durable_buckets: settings.durable_buckets.clone(),
        now: std::time::SystemTime::now(),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The sockets `serve` answers on.
#[derive(Debug)]
pub struct Listeners {
    /// S3 requests, from job pods and the runner manager.
    pub s3: tokio::net::TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`, for kubelet and Prometheus only.
    pub ops: tokio::net::TcpListener,
}

/// Connections the operations listener serves at once (probes and scrapes; a few per replica).
const OPS_MAX_CONNECTIONS: usize = 64;

/// Serve on `listeners` until `shutdown` resolves, then finish in-flight requests.
pub async fn serve(
    settings: Settings,
    dedup: Arc<DedupStore>,
    metrics: Arc<Metrics>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // Other replicas' new packs become dedup candidates here within a refresh interval (the first
    // refresh runs at once: `open` leaves an existing index as it was).
    let refresher = {
        let d = dedup.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(dedup::INDEX_REFRESH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = d.refresh_index().await {
                    tracing::warn!(error = %e, "chunk index refresh failed");
                }
            }
        })
    };
    let _stop_refresher = AbortOnDrop(refresher);
    let _stop_gc = settings.gc_interval.map(|every| {
        let (d, s) = (dedup.clone(), settings.clone());
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await; // the first tick fires immediately; skip it
            loop {
                tick.tick().await;
                match d.gc(&gc_options(&s)).await {
                    Ok(r) => tracing::info!(?r, "gc finished"),
                    Err(e) => tracing::warn!(error = %e, "gc failed"),
                }
            }
        }))
    });
    let tls = match &settings.tls {
        Some(files) => Some(tls::acceptor(files.clone(), settings.tls_reload_check)?),
        None => None,
    };
    let limits = settings.http.clone();
    let ops_limits = config::HttpLimits {
        max_connections: OPS_MAX_CONNECTIONS,
        max_connections_awaiting_headers: OPS_MAX_CONNECTIONS / 4,
        ..limits.clone()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let ops_app = ops::router(
        metrics.clone(),
        ops::Readiness::of_backend(dedup.clone(), ops::READY_TTL),
    );
    let ops = tokio::spawn(conn::serve_connections(
        listeners.ops,
        ops_app,
        ops_limits,
        None,
        stopped(stop_rx.clone()),
    ));
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let app = server::router(server::AppState::new(settings, dedup, metrics));
    let s3 = conn::serve_connections(listeners.s3, app, limits, tls, stopped(stop_rx)).await;
    let ops = ops.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
    s3.and(ops).map_err(RunError::Serve)
}
