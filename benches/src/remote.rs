//! Remote backend mode (issue 14): P1w (unique PUT), P2w (95 %-known PUT) and P3w (GET) with s3s-fs
//! behind a shaped link — each connection limited to `LINK_BYTES_PER_SEC` per direction with
//! `LINK_LATENCY_MS` one-way latency, like a remote object store — against what a runner does without
//! the proxy: one plain PUT or GET stream per object over the same shaping. Client → proxy stays
//! unshaped (the proxy runs next to the runners).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use spotrun_testkit::faultproxy::FaultProxy;
use spotrun_testkit::harness::CacheConfig;
use spotrun_testkit::s3peer::S3Peer;

use crate::data::{unique_bytes, with_changed_blocks};
use crate::http::{Http, full};
use crate::proxyproc::{ProxyProcess, ProxyStore};
use crate::report::{Goal, Row};
use crate::transfer::scrape;
use crate::{MIB, mib_per_s};

/// Bandwidth of each backend connection, per direction.
pub const LINK_BYTES_PER_SEC: u64 = 40 << 20;
/// One-way latency of the backend link.
pub const LINK_LATENCY_MS: u64 = 10;

#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Object size for all three rows.
    pub size: u64,
    /// Objects (P1w, P3w) and 95 %-known PUTs (P2w).
    pub reps: u32,
}

/// A fault proxy in front of `upstream` shaped like the remote link.
async fn shaped_link(upstream: std::net::SocketAddr) -> anyhow::Result<FaultProxy> {
    let link = FaultProxy::start(upstream)
        .await
        .context("starting the link shaper")?;
    link.faults
        .bytes_per_sec
        .store(LINK_BYTES_PER_SEC, Ordering::SeqCst);
    link.faults
        .latency_ms
        .store(LINK_LATENCY_MS, Ordering::SeqCst);
    Ok(link)
}

/// Whole-object PUT and GET with one client, through the proxy or straight over the shaped link.
struct Clients<'a> {
    http: Http,
    direct: CacheConfig,
    proxy: &'a ProxyProcess,
}

impl Clients<'_> {
    fn signer(&self, via_proxy: bool) -> CacheConfig {
        if via_proxy {
            self.proxy.signer()
        } else {
            self.direct.clone()
        }
    }

    fn context(&self, via_proxy: bool) -> String {
        if via_proxy {
            format!("through the proxy (log tail: {})", self.proxy.log_tail())
        } else {
            "direct over the shaped link".into()
        }
    }

    async fn put(&self, via_proxy: bool, key: &str, body: &Bytes) -> anyhow::Result<Duration> {
        let (url, headers) = self.signer(via_proxy).presign("PUT", key);
        let done = self
            .http
            .send_ok("PUT", &url, &headers, full(body.clone()), body.len() as u64)
            .await
            .with_context(|| self.context(via_proxy))?;
        Ok(done.elapsed)
    }

    /// GET the whole object; fails unless it is byte-identical to what was PUT.
    async fn get(&self, via_proxy: bool, key: &str, sha: &[u8; 32]) -> anyhow::Result<Duration> {
        let (url, headers) = self.signer(via_proxy).presign("GET", key);
        let done = self
            .http
            .send_ok("GET", &url, &headers, full(Bytes::new()), 0)
            .await
            .with_context(|| self.context(via_proxy))?;
        ensure!(
            &done.body_sha256 == sha,
            "GET {key} ({}) returned {} bytes that differ from the PUT body",
            if via_proxy { "proxy" } else { "direct" },
            done.body_len
        );
        Ok(done.elapsed)
    }
}

/// Time per path over a series of requests.
#[derive(Debug, Default, Clone, Copy)]
struct Pair {
    proxy: Duration,
    direct: Duration,
}

impl Pair {
    fn ratio(self) -> f64 {
        self.direct.as_secs_f64() / self.proxy.as_secs_f64().max(1e-9)
    }

    fn detail(self, bytes: u64) -> String {
        format!(
            "proxy {:.0} MiB/s, direct {:.0} MiB/s",
            mib_per_s(bytes, self.proxy),
            mib_per_s(bytes, self.direct)
        )
    }
}

/// Run P1w, P2w and P3w in one run.
pub async fn run(opts: &RemoteOptions, proxy_bin: &Path) -> anyhow::Result<Vec<Row>> {
    let size = usize::try_from(opts.size).context("object size fits memory")?;
    let peer = S3Peer::start(&["direct", "dedup"]).context("starting s3s-fs")?;
    // Two shapers, so the proxy's backend connections are counted apart from the client's.
    let backend_link = shaped_link(peer.addr).await?;
    let direct_link = shaped_link(peer.addr).await?;
    let proxy = ProxyProcess::start(
        proxy_bin,
        &ProxyStore::S3 {
            endpoint: backend_link.endpoint(),
            bucket: "dedup".into(),
            access_key: peer.access_key.clone(),
            secret_key: peer.secret_key.clone(),
        },
    )?;
    let c = Clients {
        http: Http::new(),
        direct: CacheConfig {
            server_address: direct_link.addr.to_string(),
            bucket: "direct".into(),
            access_key: peer.access_key.clone(),
            secret_key: peer.secret_key.clone(),
            region: "us-east-1".into(),
            expires: Duration::from_secs(3600),
        },
        proxy: &proxy,
    };

    // Connections (each costs a latency round trip on the link) and the proxy's first listing
    // stay outside the measurements.
    let warm = Bytes::from(unique_bytes(64 << 10, 2));
    let warm_sha: [u8; 32] = Sha256::digest(&warm).into();
    for via in [false, true] {
        c.put(via, "warmup/object", &warm).await?;
        c.get(via, "warmup/object", &warm_sha).await?;
    }

    // P1w and P3w: unique objects, each PUT then read back once on each path.
    let (mut put, mut get) = (Pair::default(), Pair::default());
    for rep in 0..opts.reps {
        let body = Bytes::from(unique_bytes(size, 5000 + u64::from(rep)));
        let sha: [u8; 32] = Sha256::digest(&body).into();
        let key = format!("p1w/{rep}");
        put.direct += c.put(false, &key, &body).await?;
        put.proxy += c.put(true, &key, &body).await?;
        get.direct += c.get(false, &key, &sha).await?;
        get.proxy += c.get(true, &key, &sha).await?;
    }

    // P2w: a base object the proxy knows, then copies with 5 % of their 1 MiB blocks new.
    let base = unique_bytes(size, 99);
    c.put(true, "p2w/base", &Bytes::from(base.clone())).await?;
    let stored_before = scrape(&c.http, &proxy, "spotrun_cache_stored_bytes_in_total").await;
    let mut known = Pair::default();
    for rep in 0..opts.reps {
        let body = Bytes::from(with_changed_blocks(&base, 5, 1 << 20, u64::from(rep) + 1));
        let key = format!("p2w/v{rep}");
        known.direct += c.put(false, &key, &body).await?;
        known.proxy += c.put(true, &key, &body).await?;
        let sha: [u8; 32] = Sha256::digest(&body).into();
        c.get(true, &key, &sha).await?;
    }
    let stored_after = scrape(&c.http, &proxy, "spotrun_cache_stored_bytes_in_total").await;
    // Pooled, so this is about the most the proxy had open at once.
    let proxy_connections = backend_link.counters.connections.load(Ordering::Relaxed);
    drop(proxy);
    drop(peer);

    let bytes = opts.size * u64::from(opts.reps);
    let link = format!(
        "{} MiB/s per connection and direction, {LINK_LATENCY_MS} ms one way",
        LINK_BYTES_PER_SEC / MIB
    );
    let new_share = match (stored_before, stored_after) {
        (Some(a), Some(b)) => format!(
            "; {:.1} % of the bytes were new to the store",
            (b - a) / bytes as f64 * 100.0
        ),
        _ => String::new(),
    };
    let size_label = format!("{} MiB", opts.size / MIB);
    Ok(vec![
        Row {
            id: "P1w",
            measure: format!(
                "remote backend: PUT unique data, proxy vs direct ({size_label} objects)"
            ),
            value: put.ratio(),
            unit: "×",
            goal: Goal::AtLeast(1.0),
            detail: format!(
                "{}; link {link}; backend connections the proxy opened in the run: \
                 {proxy_connections}",
                put.detail(bytes)
            ),
        },
        Row {
            id: "P2w",
            measure: format!(
                "remote backend: PUT with 95 % of the content known, proxy vs direct ({size_label})"
            ),
            value: known.ratio(),
            unit: "×",
            goal: Goal::AtLeast(5.0),
            detail: format!("{}{new_share}", known.detail(bytes)),
        },
        Row {
            id: "P3w",
            measure: format!("remote backend: GET, proxy vs direct ({size_label})"),
            value: get.ratio(),
            unit: "×",
            goal: Goal::AtLeast(3.0),
            detail: format!("{}; first read after the PUT", get.detail(bytes)),
        },
    ])
}
