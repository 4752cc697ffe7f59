//! P1 (unique PUT), P2 (95 %-known PUT), P3/P3r (GET cold and warm) and P10 (backend requests per GiB):
//! the proxy binary over s3s-fs, against direct requests to the same s3s-fs, with one HTTP client.
//!
//! On loopback every process shares the machine's cores, so the PUT rows also measure what bounds
//! them: the CPU time the whole machine spends per PUT on each path (`/proc/stat`), a pass-through
//! forwarder's ratio (the counting shim: one more HTTP hop and nothing else), and the proxy's own
//! per-byte work (MD5 for the `ETag`, `FastCDC`, SHA-256 per chunk) timed on one core. From these each
//! row states its ceiling on this machine: the best ratio the cores allow (see the rows' details).

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
    put_forward: Duration,
    put_proxy: Duration,
    /// CPU spent during the PUTs of each path.
    cpu_direct: Cpu,
    cpu_forward: Cpu,
    cpu_proxy: Cpu,
    get_direct_cold: Duration,
    get_direct_warm: Duration,
    get_proxy_cold: Duration,
    get_proxy_warm: Duration,
}

struct Paths<'a> {
    http: Http,
    direct: CacheConfig,
    /// Direct, through the counting shim: a pass-through forwarder.
    forward: CacheConfig,
    proxy: CacheConfig,
    proxy_process: &'a ProxyProcess,
    /// The proxy's and s3s-fs's process ids.
    pids: (u32, u32),
}

/// CPU seconds used so far: by the whole machine (`/proc/stat`: all but idle and iowait), by the
/// proxy process and by s3s-fs (`/proc/PID/stat`: user + system, all threads). `USER_HZ` is 100 on
/// every Linux ABI this runs on.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    machine: f64,
    proxy: f64,
    backend: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            machine: self.machine - o.machine,
            proxy: self.proxy - o.proxy,
            backend: self.backend - o.backend,
        }
    }
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, o: Self) {
        self.machine += o.machine;
        self.proxy += o.proxy;
        self.backend += o.backend;
    }
}

impl Cpu {
    fn now(pids: (u32, u32)) -> Self {
        Self {
            machine: machine_busy_secs(),
            proxy: process_cpu_secs(pids.0),
            backend: process_cpu_secs(pids.1),
        }
    }

    /// Per PUT, over `n` PUTs.
    fn per(self, n: f64) -> Self {
        Self {
            machine: self.machine / n,
            proxy: self.proxy / n,
            backend: self.backend / n,
        }
    }
}

fn machine_busy_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    if ticks.len() < 8 {
        return 0.0;
    }
    (ticks.iter().sum::<u64>() - ticks[3] - ticks[4]) as f64 / 100.0
}

fn process_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the command name in parentheses: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field(11) + field(12)) as f64 / 100.0
}

impl Paths<'_> {
    async fn put(&self, via_proxy: bool, key: &str, body: &Bytes) -> anyhow::Result<Duration> {
        let cfg = if via_proxy { &self.proxy } else { &self.direct };
        self.put_to(cfg, key, body)
            .await
            .with_context(|| self.context(via_proxy))
    }

    /// A PUT, and the CPU spent while it ran.
    async fn put_cpu(
        &self,
        cfg: &CacheConfig,
        key: &str,
        body: &Bytes,
    ) -> anyhow::Result<(Duration, Cpu)> {
        let before = Cpu::now(self.pids);
        let elapsed = self.put_to(cfg, key, body).await?;
        Ok((elapsed, Cpu::now(self.pids) - before))
    }

    async fn put_to(&self, cfg: &CacheConfig, key: &str, body: &Bytes) -> anyhow::Result<Duration> {
        let (url, headers) = cfg.presign("PUT", key);
        let done = self
            .http
            .send_ok("PUT", &url, &headers, full(body.clone()), body.len() as u64)
            .await?;
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
    let largest = *opts.sizes.iter().max().context("at least one size")?;
    let work = PerByteWork::measure(largest.min(256 * MIB));
    let peer = S3Peer::start(&["direct", "dedup", "counted"]).context("starting s3s-fs")?;
    // The timed proxy talks to s3s-fs itself, as the direct PUTs do; P10 counts a second proxy's
    // requests through the shim (a hop in the timed path would tax the proxy alone).
    let shim = CountingShim::start(peer.addr).await?;
    let store = |endpoint: String, bucket: &str| ProxyStore::S3 {
        endpoint,
        bucket: bucket.into(),
        access_key: peer.access_key.clone(),
        secret_key: peer.secret_key.clone(),
    };
    let proxy_process =
        ProxyProcess::start(proxy_bin, &store(format!("http://{}", peer.addr), "dedup"))?;
    let direct = CacheConfig {
        server_address: peer.addr.to_string(),
        bucket: "direct".into(),
        access_key: peer.access_key.clone(),
        secret_key: peer.secret_key.clone(),
        region: "us-east-1".into(),
        expires: Duration::from_secs(3600),
    };
    let paths = Paths {
        http: Http::new(),
        // The shim passes the Host header through, so a URL signed for it verifies at s3s-fs.
        forward: CacheConfig {
            server_address: shim.addr.to_string(),
            ..direct.clone()
        },
        direct,
        proxy: proxy_process.signer(),
        proxy_process: &proxy_process,
        pids: (proxy_process.pid(), peer.pid().unwrap_or(0)),
    };

    // Warm both paths (connections, the proxy's first manifest listing) outside the measurements.
    let warm = Bytes::from(unique_bytes(64 << 10, 1));
    let warm_sha: [u8; 32] = Sha256::digest(&warm).into();
    for via in [false, true] {
        paths.put(via, "warmup/object", &warm).await?;
        paths.get(via, "warmup/object", &warm_sha).await?;
    }

    let mut per_size = Vec::new();
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
            let (d, cpu) = paths
                .put_cpu(&paths.direct, &key, &body)
                .await
                .with_context(|| paths.context(false))?;
            t.put_direct += d;
            t.cpu_direct += cpu;
            let (d, cpu) = paths
                .put_cpu(&paths.forward, &format!("{key}.forwarded"), &body)
                .await
                .context("direct through the pass-through shim")?;
            t.put_forward += d;
            t.cpu_forward += cpu;
            let (d, cpu) = paths
                .put_cpu(&paths.proxy, &key, &body)
                .await
                .with_context(|| paths.context(true))?;
            t.put_proxy += d;
            t.cpu_proxy += cpu;
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
    let (mut known_cpu_direct, mut known_cpu_proxy) = (Cpu::default(), Cpu::default());
    let stored_before = scrape(
        &paths.http,
        &proxy_process,
        "spotrun_cache_stored_bytes_in_total",
    )
    .await;
    for rep in 0..opts.reps {
        let body = Bytes::from(with_changed_blocks(&base, 5, 1 << 20, u64::from(rep) + 1));
        let key = format!("p2/v{rep}");
        let (d, cpu) = paths
            .put_cpu(&paths.direct, &key, &body)
            .await
            .with_context(|| paths.context(false))?;
        known_direct += d;
        known_cpu_direct += cpu;
        let (d, cpu) = paths
            .put_cpu(&paths.proxy, &key, &body)
            .await
            .with_context(|| paths.context(true))?;
        known_proxy += d;
        known_cpu_proxy += cpu;
        let sha: [u8; 32] = Sha256::digest(&body).into();
        paths.get(true, &key, &sha).await?;
    }
    let stored_after = scrape(
        &paths.http,
        &proxy_process,
        "spotrun_cache_stored_bytes_in_total",
    )
    .await;
    // P10: a second proxy, its backend behind the counting shim, PUTs new objects of the largest size.
    let counted = ProxyProcess::start(
        proxy_bin,
        &store(format!("http://{}", shim.addr), "counted"),
    )?;
    let before = shim.counts.total();
    let (gets_before, puts_before) = (
        shim.counts.get.load(Ordering::Relaxed),
        shim.counts.put.load(Ordering::Relaxed),
    );
    for rep in 0..opts.reps {
        let body = Bytes::from(unique_bytes(
            usize::try_from(largest).context("size fits memory")?,
            9000 + u64::from(rep),
        ));
        let (url, headers) = counted.signer().presign("PUT", &format!("p10/{rep}"));
        paths
            .http
            .send_ok("PUT", &url, &headers, full(body.clone()), largest)
            .await
            .with_context(|| format!("P10 through the proxy (log tail: {})", counted.log_tail()))?;
    }
    let backend_requests = shim.counts.total() - before;
    let by_method = (
        shim.counts.get.load(Ordering::Relaxed) - gets_before,
        shim.counts.put.load(Ordering::Relaxed) - puts_before,
    );
    let uploaded = largest * u64::from(opts.reps);
    drop(counted);
    drop(paths);
    drop(proxy_process);
    drop(peer);

    let (largest, t) = *per_size.last().context("at least one size")?;
    let reps = f64::from(opts.reps);
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let ratio = |proxy: Duration, direct: Duration| direct.as_secs_f64() / proxy.as_secs_f64();
    let size_label = format!("{} MiB", largest / MIB);
    let mut rows = vec![Row {
        id: "P1",
        measure: format!("PUT unique data, proxy vs direct ({size_label} objects)"),
        value: ratio(t.put_proxy, t.put_direct),
        unit: "×",
        goal: Goal::AtLeast(1.0),
        detail: {
            // The best this machine allows: the forwarder path's CPU plus the proxy's hashing,
            // spread over every core, and never faster than one core's MD5 of the body.
            let (direct, fwd, proxy) = (
                t.cpu_direct.per(reps),
                t.cpu_forward.per(reps),
                t.cpu_proxy.per(reps),
            );
            let need = fwd.machine + work.hashing(largest);
            let ceiling = t.put_direct.as_secs_f64() / reps / (need / cores).max(work.md5(largest));
            format!(
                "proxy {:.0} MiB/s, direct {:.0} MiB/s, a pass-through forwarder {:.2}×. CPU per \
                 PUT (core-s, whole machine): direct {:.2} (s3s-fs {:.2}), forwarder {:.2}, proxy \
                 {:.2} (the proxy {:.2}, s3s-fs {:.2}); the proxy's hashing alone {:.2} ({}) ⇒ \
                 ceiling on {cores} cores {ceiling:.2}×",
                mib_per_s(t.bytes, t.put_proxy),
                mib_per_s(t.bytes, t.put_direct),
                ratio(t.put_forward, t.put_direct),
                direct.machine,
                direct.backend,
                fwd.machine,
                proxy.machine,
                proxy.proxy,
                proxy.backend,
                work.hashing(largest),
                work.describe(),
            )
        },
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
        detail: {
            // The best this machine allows: moving the body in (the direct path's CPU less
            // s3s-fs's MD5 of it) plus the proxy's hashing, spread over every core, and never
            // faster than one core's MD5 of the body.
            let size = opts.known_size;
            let (direct, proxy) = (known_cpu_direct.per(reps), known_cpu_proxy.per(reps));
            let need = (direct.machine - work.md5(size)).max(0.0) + work.hashing(size);
            let ceiling = known_direct.as_secs_f64() / reps / (need / cores).max(work.md5(size));
            format!(
                "proxy {:.0} MiB/s, direct {:.0} MiB/s{stored_detail}. CPU per PUT (core-s, whole \
                 machine): direct {:.2} (s3s-fs {:.2}), proxy {:.2} (the proxy {:.2}, s3s-fs \
                 {:.2}); the proxy's hashing alone {:.2}, of which MD5 {:.2} ⇒ ceiling on {cores} \
                 cores {ceiling:.2}×",
                mib_per_s(known_bytes, known_proxy),
                mib_per_s(known_bytes, known_direct),
                direct.machine,
                direct.backend,
                proxy.machine,
                proxy.proxy,
                proxy.backend,
                work.hashing(size),
                work.md5(size),
            )
        },
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
        measure: format!("backend requests per GiB uploaded ({size_label} unique PUTs)"),
        value: backend_requests as f64 / (uploaded as f64 / (1u64 << 30) as f64),
        unit: " req/GiB",
        goal: Goal::AtMost(1100.0),
        detail: format!(
            "{backend_requests} requests ({} PUT, {} GET) for {} PUTs of {:.2} GiB, counted at the \
             backend",
            by_method.1,
            by_method.0,
            opts.reps,
            uploaded as f64 / (1u64 << 30) as f64,
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
            series("PUT pass-through forwarder", |t| t.put_forward),
            series("PUT proxy (unique)", |t| t.put_proxy),
            series("GET direct", |t| t.get_direct_cold),
            series("GET proxy, cold", |t| t.get_proxy_cold),
            series("GET proxy, warm", |t| t.get_proxy_warm),
        ],
    };
    Ok((rows, plot))
}

/// What the proxy must do per byte of a PUT besides moving it, timed on one core: MD5 of the body
/// (the `ETag`; sequential, so one stream cannot spread it over cores) and `FastCDC` + SHA-256 per
/// chunk (the ingest's two stages).
#[derive(Debug, Clone, Copy)]
struct PerByteWork {
    md5_secs_per_byte: f64,
    chunk_hash_secs_per_byte: f64,
}

impl PerByteWork {
    fn measure(size: u64) -> Self {
        use md5::Digest as _;
        let data = unique_bytes(usize::try_from(size).unwrap_or(usize::MAX).max(1 << 20), 5);
        let n = data.len() as f64;
        let best = |f: &mut dyn FnMut()| {
            (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let md5 = best(&mut || {
            let mut h = md5::Md5::new();
            for piece in data.chunks(256 << 10) {
                h.update(piece);
            }
            std::hint::black_box(h.finalize());
        });
        let (min, avg, max) = spotrun_cache_proxy::dedup::DATA_CDC;
        let chunk_hash = best(&mut || {
            for c in fastcdc::v2020::FastCDC::new(&data, min, avg, max) {
                std::hint::black_box(Sha256::digest(&data[c.offset..c.offset + c.length]));
            }
        });
        Self {
            md5_secs_per_byte: md5 / n,
            chunk_hash_secs_per_byte: chunk_hash / n,
        }
    }

    /// Seconds of MD5 for `bytes` on one core.
    fn md5(&self, bytes: u64) -> f64 {
        self.md5_secs_per_byte * bytes as f64
    }

    /// CPU seconds of all the hashing for `bytes`.
    fn hashing(&self, bytes: u64) -> f64 {
        (self.md5_secs_per_byte + self.chunk_hash_secs_per_byte) * bytes as f64
    }

    fn describe(&self) -> String {
        let rate = |secs_per_byte: f64| 1.0 / secs_per_byte / MIB as f64;
        format!(
            "MD5 {:.0} MiB/s, FastCDC + SHA-256 {:.0} MiB/s on one core",
            rate(self.md5_secs_per_byte),
            rate(self.chunk_hash_secs_per_byte)
        )
    }
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
