//! The operations endpoints (`/metrics`, `/healthz`, `/readyz`) on their own listener: they are
//! unauthenticated, so they stay off the S3 port that job pods reach (issue 16: chunk-hit counters
//! told a job whether a guessed file was already in someone else's cache).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::time::Instant;

use crate::dedup::DedupStore;
use crate::metrics::Metrics;

/// How long one backend probe answers `/readyz`: kubelet probes every few seconds per replica, and
/// each probe must not become a backend request (issue 16).
pub const READY_TTL: Duration = Duration::from_secs(5);
/// A probe slower than this counts as not ready (kubelet's own probe timeout defaults to 1 s).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

type Probe = dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync;

/// Backend reachability, probed at most once per `ttl`; concurrent callers share one probe.
pub struct Readiness {
    probe: Box<Probe>,
    ttl: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    #[must_use]
    pub fn new(probe: Box<Probe>, ttl: Duration) -> Self {
        Self {
            probe,
            ttl,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Readiness of `dedup`'s backend (`BlobStore::ping`).
    #[must_use]
    pub fn of_backend(dedup: Arc<DedupStore>, ttl: Duration) -> Self {
        Self::new(
            Box::new(move || {
                let d = dedup.clone();
                Box::pin(async move { d.blob().ping().await.map_err(|e| e.to_string()) })
            }),
            ttl,
        )
    }

    /// The cached verdict, or a fresh probe once the last one is `ttl` old.
    pub async fn check(&self) -> Result<(), String> {
        // Held across the probe: callers arriving meanwhile wait for its answer instead of probing.
        let mut last = self.last.lock().await;
        if let Some((at, verdict)) = &*last
            && at.elapsed() < self.ttl
        {
            return verdict.clone();
        }
        let verdict = match tokio::time::timeout(PROBE_TIMEOUT, (self.probe)()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
        };
        if let Err(e) = &verdict {
            tracing::warn!(error = %e, "backend not reachable");
        }
        *last = Some((Instant::now(), verdict.clone()));
        verdict
    }
}

#[derive(Debug)]
struct OpsState {
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

/// The operations router; anything else is 404.
pub fn router(metrics: Arc<Metrics>, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(OpsState { metrics, readiness }))
}

async fn render_metrics(State(st): State<Arc<OpsState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
}

async fn readyz(State(st): State<Arc<OpsState>>) -> Response {
    match st.readiness.check().await {
        Ok(()) => "ready\n".into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "backend unavailable\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    fn counting(up: Arc<AtomicBool>, calls: Arc<AtomicUsize>) -> Readiness {
        Readiness::new(
            Box::new(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                let up = up.load(Ordering::SeqCst);
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if up { Ok(()) } else { Err("down".into()) }
                })
            }),
            READY_TTL,
        )
    }

    /// Regression (issue 16): every `/readyz` called the backend.
    #[tokio::test(start_paused = true)]
    async fn readiness_probes_the_backend_at_most_once_per_ttl() {
        let (up, calls) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicUsize::new(0)),
        );
        let r = Arc::new(counting(up.clone(), calls.clone()));
        let burst: Vec<_> = (0..50)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { r.check().await })
            })
            .collect();
        for t in burst {
            assert_eq!(t.await.unwrap(), Ok(()));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one probe for the burst");
        up.store(false, Ordering::SeqCst);
        tokio::time::advance(READY_TTL / 2).await;
        assert_eq!(r.check().await, Ok(()), "still the cached verdict");
        tokio::time::advance(READY_TTL).await;
        assert_eq!(r.check().await, Err("down".into()));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_hangs_is_not_ready() {
        let r = Readiness::new(Box::new(|| Box::pin(std::future::pending())), READY_TTL);
        assert_eq!(r.check().await, Err("no answer within 3s".into()));
    }
}
