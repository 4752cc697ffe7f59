//! Scale rows on the proxy's disk store (issue 14), each through the proxy binary over HTTP: S1 tiny-PUT
//! latency with an empty store vs one holding many chunks, S2 restart-to-ready with few vs many keys,
//! S3 peak RSS of a fresh proxy serving one GET of a zip with many entries.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::MIB;
use crate::data::{small_files_zip, unique_bytes};
use crate::http::{Http, full};
use crate::proxyproc::{ProxyProcess, ProxyStore};
use crate::report::{Goal, Row};
use crate::transfer::scrape;

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// S1: 1 KiB PUTs timed at each store size (the median is the figure).
    pub tiny_puts: u32,
    /// S1: chunks stored before the second series (zip entries of ~60 bytes, one chunk each).
    pub fill_chunks: usize,
    /// S2: keys stored for the first and the second restart series.
    pub restart_keys: (u32, u32),
    /// S3: entries of the context zip and of the measured one.
    pub rss_entries: (usize, usize),
}

/// Size of a tiny PUT (S1) and of each key's body (S2).
const TINY: usize = 1024;
/// Entries per fill archive: its central directory (~80 B per entry) stays inline in the manifest.
const FILL_ENTRIES_PER_ZIP: usize = 8192;
/// PUTs in flight while filling a store.
const FILL_PARALLEL: usize = 8;
/// Restarts per S2 series (the median is the figure).
const RESTARTS: usize = 3;
/// How long a restart or a fill may take before the run fails.
const READY_WITHIN: Duration = Duration::from_secs(600);

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

async fn put(
    http: &Http,
    proxy: &ProxyProcess,
    key: &str,
    body: Bytes,
) -> anyhow::Result<Duration> {
    let (url, headers) = proxy.signer().presign("PUT", key);
    let len = body.len() as u64;
    let done = http
        .send_ok("PUT", &url, &headers, full(body), len)
        .await
        .with_context(|| format!("PUT {key} (log tail: {})", proxy.log_tail()))?;
    Ok(done.elapsed)
}

async fn get_exact(
    http: &Http,
    proxy: &ProxyProcess,
    key: &str,
    sha: &[u8; 32],
) -> anyhow::Result<()> {
    let (url, headers) = proxy.signer().presign("GET", key);
    let done = http
        .send_ok("GET", &url, &headers, full(Bytes::new()), 0)
        .await
        .with_context(|| format!("GET {key} (log tail: {})", proxy.log_tail()))?;
    ensure!(
        &done.body_sha256 == sha,
        "GET {key} returned {} bytes that differ from the PUT body",
        done.body_len
    );
    Ok(())
}

/// `n` sequential 1 KiB PUTs of new bytes: their latencies, sorted.
async fn tiny_puts(
    http: &Http,
    proxy: &ProxyProcess,
    prefix: &str,
    n: u32,
    seed: u64,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n as usize);
    for i in 0..n {
        let body = Bytes::from(unique_bytes(TINY, seed + u64::from(i)));
        times.push(put(http, proxy, &format!("{prefix}/{i}"), body).await?);
    }
    times.sort_unstable();
    ensure!(!times.is_empty(), "no tiny PUTs asked for");
    Ok(times)
}

/// Store keys `range` (1 KiB of new bytes each), `FILL_PARALLEL` at a time.
async fn fill_keys(
    http: &Http,
    proxy: &ProxyProcess,
    range: std::ops::Range<u32>,
) -> anyhow::Result<()> {
    futures::stream::iter(range)
        .map(|i| async move {
            let body = Bytes::from(unique_bytes(TINY, 300_000 + u64::from(i)));
            put(http, proxy, &format!("keys/{i}"), body).await
        })
        .buffer_unordered(FILL_PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// S1: median 1 KiB PUT latency with an empty store, then with `fill_chunks` more chunks stored.
async fn tiny_put_latency(proxy_bin: &Path, opts: &ScaleOptions) -> anyhow::Result<Row> {
    let http = Http::new();
    let proxy = ProxyProcess::start(proxy_bin, &ProxyStore::Disk)?;
    tiny_puts(&http, &proxy, "tiny/warmup", 3, 1).await?;
    let empty = tiny_puts(&http, &proxy, "tiny/empty", opts.tiny_puts, 100_000).await?;

    let chunks_before = scrape(&http, &proxy, "spotrun_cache_chunk_misses_total").await;
    let zips = opts.fill_chunks.div_ceil(FILL_ENTRIES_PER_ZIP);
    futures::stream::iter(0..zips)
        .map(|z| {
            let (http, proxy) = (&http, &proxy);
            async move {
                let zip = tokio::task::spawn_blocking(move || {
                    small_files_zip(FILL_ENTRIES_PER_ZIP, 10_000 + z as u64)
                })
                .await
                .context("generating a fill archive")?;
                put(http, proxy, &format!("fill/{z}.zip"), Bytes::from(zip)).await
            }
        })
        .buffer_unordered(FILL_PARALLEL / 2)
        .try_collect::<Vec<_>>()
        .await?;
    let chunks_after = scrape(&http, &proxy, "spotrun_cache_chunk_misses_total").await;
    let filled = tiny_puts(&http, &proxy, "tiny/filled", opts.tiny_puts, 200_000).await?;

    let entries = zips * FILL_ENTRIES_PER_ZIP;
    let stored = match (chunks_before, chunks_after) {
        (Some(a), Some(b)) => format!("{:.0} new chunks per /metrics", b - a),
        _ => "chunk count not in /metrics".into(),
    };
    let (e, f) = (percentile(&empty, 50), percentile(&filled, 50));
    Ok(Row {
        id: "S1",
        measure: format!(
            "disk store: 1 KiB PUT latency with {}k zip entries stored vs an empty store (median)",
            entries / 1000
        ),
        value: f.as_secs_f64() / e.as_secs_f64().max(1e-9),
        unit: "×",
        goal: Goal::AtMost(1.5),
        detail: format!(
            "median {:.2} ms vs {:.2} ms empty (p90 {:.2} vs {:.2} ms), {} PUTs each; stored {zips} \
             zips of {FILL_ENTRIES_PER_ZIP} small files between the series ({stored})",
            ms(f),
            ms(e),
            ms(percentile(&filled, 90)),
            ms(percentile(&empty, 90)),
            opts.tiny_puts
        ),
    })
}

/// One restart: process start → readiness probe answers 200 → a first GET is byte-identical.
async fn restart_to_ready(proxy: &mut ProxyProcess, sha: &[u8; 32]) -> anyhow::Result<Duration> {
    // A new client: no pooled connection to the process being replaced.
    let http = Http::new();
    let spawned = proxy.restart()?;
    proxy.wait_ready(&http, READY_WITHIN).await?;
    get_exact(&http, proxy, "keys/0", sha).await?;
    Ok(spawned.elapsed())
}

async fn median_restart(proxy: &mut ProxyProcess, sha: &[u8; 32]) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(RESTARTS);
    for _ in 0..RESTARTS {
        times.push(restart_to_ready(proxy, sha).await?);
    }
    times.sort_unstable();
    Ok(percentile(&times, 50))
}

/// S2: restart-to-ready with `few` keys stored, then with `many`.
async fn restart_time(proxy_bin: &Path, (few, many): (u32, u32)) -> anyhow::Result<Row> {
    ensure!(few >= 1 && many > few, "restart keys: need 1 ≤ few < many");
    let http = Http::new();
    let mut proxy = ProxyProcess::start(proxy_bin, &ProxyStore::Disk)?;
    fill_keys(&http, &proxy, 0..few).await?;
    let sha: [u8; 32] = Sha256::digest(unique_bytes(TINY, 300_000)).into();
    let t_few = median_restart(&mut proxy, &sha).await?;
    // A new client: the first one's connections went to the process the restarts replaced.
    fill_keys(&Http::new(), &proxy, few..many).await?;
    let t_many = median_restart(&mut proxy, &sha).await?;
    Ok(Row {
        id: "S2",
        measure: format!("disk store: restart-to-ready with {many} keys vs {few} keys"),
        value: t_many.as_secs_f64() / t_few.as_secs_f64().max(1e-9),
        unit: "×",
        goal: Goal::AtMost(2.0),
        detail: format!(
            "{:.0} ms vs {:.0} ms, median of {RESTARTS} restarts each: process start → /readyz 200 → \
             a first GET byte-identical; 1 KiB keys",
            ms(t_many),
            ms(t_few)
        ),
    })
}

/// Peak RSS of a fresh proxy (restarted after the PUT) serving one GET of an `entries`-file zip:
/// (`VmHWM` once ready, `VmHWM` after the GET, zip size).
async fn one_get_peak_rss(proxy_bin: &Path, entries: usize) -> anyhow::Result<(u64, u64, u64)> {
    let zip = tokio::task::spawn_blocking(move || small_files_zip(entries, 7))
        .await
        .context("generating the archive")?;
    let sha: [u8; 32] = Sha256::digest(&zip).into();
    let len = zip.len() as u64;
    let mut proxy = ProxyProcess::start(proxy_bin, &ProxyStore::Disk)?;
    put(&Http::new(), &proxy, "rss/cache.zip", Bytes::from(zip)).await?;
    let http = Http::new();
    proxy.restart()?;
    proxy.wait_ready(&http, READY_WITHIN).await?;
    let ready = proxy.peak_rss()?;
    get_exact(&http, &proxy, "rss/cache.zip", &sha).await?;
    Ok((ready, proxy.peak_rss()?, len))
}

/// S3: one GET of the large zip, with the small one as context.
async fn get_peak_rss(proxy_bin: &Path, (small, large): (usize, usize)) -> anyhow::Result<Row> {
    let (s_ready, s_peak, s_len) = one_get_peak_rss(proxy_bin, small).await?;
    let (l_ready, l_peak, l_len) = one_get_peak_rss(proxy_bin, large).await?;
    Ok(Row {
        id: "S3",
        measure: format!("disk store: proxy peak RSS, one GET of a {large}-entry zip"),
        value: mib(l_peak),
        unit: " MiB",
        goal: Goal::AtMost(64.0),
        detail: format!(
            "VmHWM of a fresh process ({:.1} MiB once ready, before the GET; zip {:.2} MiB); \
             {small} entries: {:.1} MiB ({:.1} MiB once ready; zip {:.2} MiB)",
            mib(l_ready),
            mib(l_len),
            mib(s_peak),
            mib(s_ready),
            mib(s_len)
        ),
    })
}

/// Run S1, S2 and S3, each on its own fresh store; `progress` gets a line after each.
pub async fn run(
    opts: &ScaleOptions,
    proxy_bin: &Path,
    progress: &dyn Fn(&str),
) -> anyhow::Result<Vec<Row>> {
    let t = Instant::now();
    let s1 = tiny_put_latency(proxy_bin, opts)
        .await
        .context("S1 tiny-PUT latency")?;
    progress(&format!(
        "S1 tiny PUTs done in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let t = Instant::now();
    let s2 = restart_time(proxy_bin, opts.restart_keys)
        .await
        .context("S2 restart-to-ready")?;
    progress(&format!(
        "S2 restarts done in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let t = Instant::now();
    let s3 = get_peak_rss(proxy_bin, opts.rss_entries)
        .await
        .context("S3 peak RSS of one GET")?;
    progress(&format!(
        "S3 peak RSS done in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(vec![s1, s2, s3])
}
