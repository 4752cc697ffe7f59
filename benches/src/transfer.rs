//! P1 (unique PUT), P2 (95 %-known PUT), P3/P3r (GET cold and warm) and P10 (backend requests per GiB):
//! the proxy binary over s3s-fs, against direct requests to the same s3s-fs, with one HTTP client.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use spotrun_testkit::harness::CacheConfig;
use spotrun_testkit::s3peer::S3Peer;

use crate::data::{unique_bytes, with_changed_blocks};
use crate::http::{Http, full};
use crate::proxyproc::{ProxyProcess, ProxyStore};
use crate::report::{Goal, Plot, Row, Series};
use crate::shim::CountingShim;
use crate::{MIB, mib_per_s};

#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Object sizes for P1/P3 (and the throughput plot).
    pub sizes: Vec<u64>,
    /// Objects per size (each PUT through the proxy gets new bytes).
    pub reps: u32,
    /// Object size for P2.
    pub known_size: u64,
}

/// Time and bytes per path at one object size.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    bytes: u64,
    put_direct: Duration,
    put_proxy: Duration,
    get_direct_cold: Duration,
    get_direct_warm: Duration,
    get_proxy_cold: Duration,
    get_proxy_warm: Duration,
}

struct Paths<'a> {
    http: Http,
    direct: CacheConfig,
    proxy: CacheConfig,
    proxy_process: &'a ProxyProcess,
}

impl Paths<'_> {
    async fn put(&self, via_proxy: bool, key: &str, body: &Bytes) -> anyhow::Result<Duration> {
        let cfg = if via_proxy { &self.proxy } else { &self.direct };
        let (url, headers) = cfg.presign("PUT", key);
        let done = self
            .http
            .send_ok("PUT", &url, &headers, full(body.clone()), body.len() as u64)
            .await
            .with_context(|| self.context(via_proxy))?;
        Ok(done.elapsed)
    }

    /// GET the whole object; fails unless the body is byte-identical to what was PUT.
    async fn get(&self, via_proxy: bool, key: &str, sha: &[u8; 32]) -> anyhow::Result<Duration> {
        let cfg = if via_proxy { &self.proxy } else { &self.direct };
        let (url, headers) = cfg.presign("GET", key);
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

    fn context(&self, via_proxy: bool) -> String {
        if via_proxy {
            format!(
                "through the proxy (log tail: {})",
                self.proxy_process.log_tail()
            )
        } else {
            "direct to s3s-fs".into()
        }
    }
}

/// Run P1, P2, P3 and P10; returns their rows and the throughput plot.
pub async fn run(opts: &TransferOptions, proxy_bin: &Path) -> anyhow::Result<(Vec<Row>, Plot)> {
    let peer = S3Peer::start(&["direct", "dedup"]).context("starting s3s-fs")?;
    let shim = CountingShim::start(peer.addr).await?;
    let proxy_process = ProxyProcess::start(
        proxy_bin,
        &ProxyStore::S3 {
            endpoint: format!("http://{}", shim.addr),
            bucket: "dedup".into(),
            access_key: peer.access_key.clone(),
            secret_key: peer.secret_key.clone(),
        },
    )?;
    let paths = Paths {
        http: Http::new(),
        direct: CacheConfig {
            server_address: peer.addr.to_string(),
            bucket: "direct".into(),
            access_key: peer.access_key.clone(),
            secret_key: peer.secret_key.clone(),
            region: "us-east-1".into(),
            expires: Duration::from_secs(3600),
        },
        proxy: proxy_process.signer(),
        proxy_process: &proxy_process,
    };

    // Warm both paths (connections, the proxy's first manifest listing) outside the measurements.
    let warm = Bytes::from(unique_bytes(64 << 10, 1));
    let warm_sha: [u8; 32] = Sha256::digest(&warm).into();
    for via in [false, true] {
        paths.put(via, "warmup/object", &warm).await?;
        paths.get(via, "warmup/object", &warm_sha).await?;
    }

    let mut per_size = Vec::new();
    let mut backend_requests = 0u64;
    let mut uploaded = 0u64;
    let mut puts = 0u64;
    for (si, &size) in opts.sizes.iter().enumerate() {
        let mut t = Totals::default();
        for rep in 0..opts.reps {
            let seed = 1000 + si as u64 * 100 + u64::from(rep);
            let body = Bytes::from(unique_bytes(
                usize::try_from(size).context("size fits memory")?,
                seed,
            ));
            let sha: [u8; 32] = Sha256::digest(&body).into();
            let key = format!("p1/{size}/{rep}");
            t.bytes += size;
            t.put_direct += paths.put(false, &key, &body).await?;
            let before = shim.counts.total();
            t.put_proxy += paths.put(true, &key, &body).await?;
            backend_requests += shim.counts.total() - before;
            uploaded += size;
            puts += 1;
            t.get_direct_cold += paths.get(false, &key, &sha).await?;
            t.get_proxy_cold += paths.get(true, &key, &sha).await?;
            t.get_direct_warm += paths.get(false, &key, &sha).await?;
            t.get_proxy_warm += paths.get(true, &key, &sha).await?;
        }
        per_size.push((size, t));
    }

    // P2: a base object, then PUTs of copies with 5 % of their 1 MiB blocks new.
    let base = unique_bytes(
        usize::try_from(opts.known_size).context("size fits memory")?,
        77,
    );
    let base_bytes = Bytes::from(base.clone());
    paths.put(true, "p2/base", &base_bytes).await?;
    paths.put(false, "p2/base", &base_bytes).await?;
    let (mut known_direct, mut known_proxy) = (Duration::ZERO, Duration::ZERO);
    let stored_before = scrape(
        &paths.http,
        &proxy_process,
        "spotrun_cache_stored_bytes_in_total",
    )
    .await;
    for rep in 0..opts.reps {
        let body = Bytes::from(with_changed_blocks(&base, 5, 1 << 20, u64::from(rep) + 1));
        let key = format!("p2/v{rep}");
        known_direct += paths.put(false, &key, &body).await?;
        known_proxy += paths.put(true, &key, &body).await?;
        let sha: [u8; 32] = Sha256::digest(&body).into();
        paths.get(true, &key, &sha).await?;
    }
    let stored_after = scrape(
        &paths.http,
        &proxy_process,
        "spotrun_cache_stored_bytes_in_total",
    )
    .await;
    let get_counts = (
        shim.counts.get.load(Ordering::Relaxed),
        shim.counts.put.load(Ordering::Relaxed),
    );
    drop(proxy_process);
    drop(peer);

    let (largest, t) = *per_size.last().context("at least one size")?;
    let ratio = |proxy: Duration, direct: Duration| direct.as_secs_f64() / proxy.as_secs_f64();
    let size_label = format!("{} MiB", largest / MIB);
    let mut rows = vec![Row {
        id: "P1",
        measure: format!("PUT unique data, proxy vs direct ({size_label} objects)"),
        value: ratio(t.put_proxy, t.put_direct),
        unit: "×",
        goal: Goal::AtLeast(1.0),
        detail: format!(
            "proxy {:.0} MiB/s, direct {:.0} MiB/s",
            mib_per_s(t.bytes, t.put_proxy),
            mib_per_s(t.bytes, t.put_direct)
        ),
    }];
    let known_bytes = opts.known_size * u64::from(opts.reps);
    let stored_detail = match (stored_before, stored_after) {
        (Some(a), Some(b)) => format!(
            "; {:.1} % of the bytes were new to the store",
            (b - a) / known_bytes as f64 * 100.0
        ),
        _ => String::new(),
    };
    rows.push(Row {
        id: "P2",
        measure: format!(
            "PUT with 95 % of the content known, proxy vs direct ({} MiB)",
            opts.known_size / MIB
        ),
        value: ratio(known_proxy, known_direct),
        unit: "×",
        goal: Goal::AtLeast(5.0),
        detail: format!(
            "proxy {:.0} MiB/s, direct {:.0} MiB/s{stored_detail}",
            mib_per_s(known_bytes, known_proxy),
            mib_per_s(known_bytes, known_direct)
        ),
    });
    rows.push(Row {
        id: "P3",
        measure: format!("GET cold (first read), proxy vs direct ({size_label})"),
        value: ratio(t.get_proxy_cold, t.get_direct_cold),
        unit: "×",
        goal: Goal::AtLeast(1.0),
        detail: format!(
            "proxy {:.0} MiB/s, direct {:.0} MiB/s",
            mib_per_s(t.bytes, t.get_proxy_cold),
            mib_per_s(t.bytes, t.get_direct_cold)
        ),
    });
    rows.push(Row {
        id: "P3r",
        measure: format!("GET warm (repeated read), proxy vs direct ({size_label})"),
        value: ratio(t.get_proxy_warm, t.get_direct_warm),
        unit: "×",
        goal: Goal::None,
        detail: format!(
            "proxy {:.0} MiB/s, direct {:.0} MiB/s",
            mib_per_s(t.bytes, t.get_proxy_warm),
            mib_per_s(t.bytes, t.get_direct_warm)
        ),
    });
    rows.push(Row {
        id: "P10",
        measure: "backend requests per GiB uploaded (P1 PUTs)".into(),
        value: backend_requests as f64 / (uploaded as f64 / (1u64 << 30) as f64),
        unit: " req/GiB",
        goal: Goal::AtMost(1100.0),
        detail: format!(
            "{backend_requests} requests for {puts} PUTs of {:.2} GiB, counted at the backend \
             (whole run: {} GET, {} PUT)",
            uploaded as f64 / (1u64 << 30) as f64,
            get_counts.0,
            get_counts.1
        ),
    });

    let series = |name: &str, pick: fn(&Totals) -> Duration| Series {
        name: name.into(),
        points: per_size
            .iter()
            .map(|(size, t)| (*size as f64 / MIB as f64, mib_per_s(t.bytes, pick(t))))
            .collect(),
    };
    let plot = Plot {
        file: "throughput.svg",
        title: "Throughput vs object size (loopback, s3s-fs backend)".into(),
        x_label: "object size (MiB)".into(),
        y_label: "MiB/s".into(),
        log_x: true,
        series: vec![
            series("PUT direct", |t| t.put_direct),
            series("PUT proxy (unique)", |t| t.put_proxy),
            series("GET direct", |t| t.get_direct_cold),
            series("GET proxy, cold", |t| t.get_proxy_cold),
            series("GET proxy, warm", |t| t.get_proxy_warm),
        ],
    };
    Ok((rows, plot))
}

/// One counter from the proxy's `/metrics`.
pub(crate) async fn scrape(http: &Http, proxy: &ProxyProcess, name: &str) -> Option<f64> {
    let done = http
        .send(
            "GET",
            &proxy.ops_url("/metrics"),
            &[],
            full(Bytes::new()),
            0,
        )
        .await
        .ok()?;
    done.small_body
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}
