//! spotrun benchmarks (issue 7): the cache throughput program's logic — each figure measured against a
//! baseline taken in the same run on loopback — and the report it writes (`BENCHMARKS.md`, SVG plots).
#![allow(
    clippy::cast_precision_loss,
    reason = "byte counts become MiB/s and ratios for people to read"
)]

pub mod bins;
pub mod cpu;
pub mod data;
pub mod executor;
pub mod http;
pub mod memory;
pub mod proxyproc;
pub mod remote;
pub mod report;
pub mod scale;
pub mod shim;
pub mod storage;
pub mod transfer;

use std::time::{Duration, Instant};

use anyhow::Context;
pub use report::{Goal, Plot, Report, Row, Series};

pub const MIB: u64 = 1 << 20;

#[must_use]
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64().max(1e-9)
}

/// What to measure, and how big.
#[derive(Debug, Clone)]
pub struct Options {
    /// P1/P3 object sizes in MiB (the throughput plot's x axis).
    pub sizes_mib: Vec<u64>,
    /// Objects per size, and P2 repetitions.
    pub reps: u32,
    /// P2 object size in MiB.
    pub known_mib: u64,
    /// P4 buffer in MiB.
    pub hash_mib: u64,
    /// Files in the generated dependency tree (P5, P6).
    pub tree_files: usize,
    /// Versions stored for P5.
    pub versions: u32,
    /// P7: one streaming PUT of this many MiB ...
    pub big_mib: u64,
    /// ... and this many concurrent PUTs ...
    pub concurrent: usize,
    /// ... of this many MiB each.
    pub concurrent_mib: u64,
    /// P8/P9: jobs run through the executor ...
    pub jobs: u32,
    /// ... with this many empty user stages each.
    pub empty_stages: u32,
    /// P1w-P3w: object size in MiB over the shaped remote link (`reps` objects).
    pub remote_mib: u64,
    /// S1: 1 KiB PUTs timed per store size ...
    pub tiny_puts: u32,
    /// ... and the chunks stored between the two series.
    pub fill_chunks: usize,
    /// S2: keys stored for the first and the second restart series.
    pub restart_keys: (u32, u32),
    /// S3: entries of the context zip and of the measured one.
    pub rss_entries: (usize, usize),
    /// Only these groups (see `GROUPS`); empty = all.
    pub only: Vec<String>,
}

impl Options {
    /// Small sizes: under 3 minutes even in a debug build (CI runs this).
    #[must_use]
    pub fn quick() -> Self {
        Self {
            sizes_mib: vec![1, 4, 16],
            reps: 2,
            known_mib: 16,
            hash_mib: 32,
            tree_files: 600,
            versions: 10,
            big_mib: 128,
            concurrent: 8,
            concurrent_mib: 16,
            jobs: 2,
            empty_stages: 3,
            remote_mib: 4,
            tiny_puts: 20,
            fill_chunks: 8192,
            restart_keys: (20, 200),
            rss_entries: (200, 2000),
            only: Vec::new(),
        }
    }

    /// The sizes of issue 7 (`BENCHMARKS.md`).
    #[must_use]
    pub fn full() -> Self {
        Self {
            sizes_mib: vec![1, 4, 16, 64, 256],
            reps: 3,
            known_mib: 256,
            hash_mib: 256,
            tree_files: 3000,
            versions: 10,
            big_mib: 4096,
            concurrent: 32,
            concurrent_mib: 256,
            jobs: 10,
            empty_stages: 4,
            remote_mib: 256,
            tiny_puts: 300,
            fill_chunks: 128 << 10,
            restart_keys: (1000, 10_000),
            rss_entries: (2000, 200_000),
            only: Vec::new(),
        }
    }

    /// Whether the group `name` runs (see `only`).
    #[must_use]
    pub fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == name)
    }

    /// One line describing the sizes, for the report.
    #[must_use]
    pub fn describe(&self) -> String {
        format!(
            "P1/P3 objects of {:?} MiB × {} each; P2 {} MiB × {}; P4 {} MiB; P5/P6 a {}-file tree, {} versions; \
             P7 one {} MiB PUT and {} × {} MiB concurrent; P8/P9 {} jobs × {} empty stages; \
             P1w-P3w {} MiB × {} over the shaped link; S1 {} 1 KiB PUTs per series, {} chunks stored; \
             S2 {} vs {} keys; S3 {}- and {}-entry zips",
            self.sizes_mib,
            self.reps,
            self.known_mib,
            self.reps,
            self.hash_mib,
            self.tree_files,
            self.versions,
            self.big_mib,
            self.concurrent,
            self.concurrent_mib,
            self.jobs,
            self.empty_stages,
            self.remote_mib,
            self.reps,
            self.tiny_puts,
            self.fill_chunks,
            self.restart_keys.0,
            self.restart_keys.1,
            self.rss_entries.0,
            self.rss_entries.1
        )
    }
}

/// The benchmark groups `--only` accepts.
pub const GROUPS: [&str; 7] = [
    "cpu", "transfer", "storage", "memory", "executor", "remote", "scale",
];

/// Writes back what earlier groups left dirty in the page cache (the transfers and P7 write
/// gigabytes) before a group starts, so one group's writeback does not slow the next.
async fn settle() {
    let _ = tokio::process::Command::new("sync").status().await;
}

/// Run every benchmark in order; `progress` gets one line per phase.
pub async fn run(opts: &Options, progress: &dyn Fn(&str)) -> anyhow::Result<Report> {
    let proxy_bin = bins::workspace_binary("spotrun-cache-proxy", "spotrun-cache-proxy")?;
    let mut report = Report::default();
    let phase = |name: &str, started: Instant| {
        progress(&format!(
            "{name} done in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
    };

    for g in &opts.only {
        anyhow::ensure!(
            GROUPS.contains(&g.as_str()),
            "unknown benchmark group {g:?} (known: {})",
            GROUPS.join(", ")
        );
    }
    if opts.wants("cpu") {
        let t = Instant::now();
        let hash_bytes = usize::try_from(opts.hash_mib * MIB).context("P4 size fits memory")?;
        report.rows.push(
            tokio::task::spawn_blocking(move || cpu::run(hash_bytes))
                .await
                .context("P4 panicked")?,
        );
        phase("P4 chunk + hash", t);
    }
    // Latency benchmarks first, before the transfers leave gigabytes of deleted files for the
    // filesystem to clean up (P9 measured 22-28 ms after them, 17 ms before).
    if opts.wants("executor") {
        let t = Instant::now();
        report.rows.extend(
            executor::run(opts.jobs, opts.empty_stages)
                .await
                .context("P8/P9 executor benchmark")?,
        );
        phase("P8/P9 executor", t);
    }
    if opts.wants("transfer") {
        settle().await;
        let t = Instant::now();
        let transfer_opts = transfer::TransferOptions {
            sizes: opts.sizes_mib.iter().map(|m| m * MIB).collect(),
            reps: opts.reps,
            known_size: opts.known_mib * MIB,
        };
        let (rows, plot) = transfer::run(&transfer_opts, &proxy_bin)
            .await
            .context("P1/P2/P3/P10 transfer benchmark")?;
        report.rows.extend(rows);
        report.plots.push(plot);
        phase("P1/P2/P3/P10 transfers", t);
    }
    if opts.wants("storage") {
        settle().await;
        let t = Instant::now();
        let (rows, plot) = storage::versions(opts.tree_files, opts.versions)
            .await
            .context("P5 versions benchmark")?;
        report.rows.extend(rows);
        report.plots.push(plot);
        report.rows.push(
            storage::mtime_only(opts.tree_files)
                .await
                .context("P6 mtime-only benchmark")?,
        );
        phase("P5/P6 storage", t);
    }
    if opts.wants("memory") {
        settle().await;
        let t = Instant::now();
        let shipped = bins::shipped_binary("spotrun-cache-proxy")?;
        report.rows.extend(
            memory::run(
                &shipped,
                &proxy_bin,
                opts.big_mib * MIB,
                opts.concurrent,
                opts.concurrent_mib * MIB,
            )
            .await
            .context("P7 peak RSS benchmark")?,
        );
        phase("P7 peak RSS", t);
    }

    if opts.wants("remote") {
        settle().await;
        let t = Instant::now();
        let remote_opts = remote::RemoteOptions {
            size: opts.remote_mib * MIB,
            reps: opts.reps,
        };
        report.rows.extend(
            remote::run(&remote_opts, &proxy_bin)
                .await
                .context("P1w/P2w/P3w remote backend benchmark")?,
        );
        phase("P1w/P2w/P3w remote backend", t);
    }
    if opts.wants("scale") {
        settle().await;
        let t = Instant::now();
        let scale_opts = scale::ScaleOptions {
            tiny_puts: opts.tiny_puts,
            fill_chunks: opts.fill_chunks,
            restart_keys: opts.restart_keys,
            rss_entries: opts.rss_entries,
        };
        report.rows.extend(
            scale::run(&scale_opts, &proxy_bin, progress)
                .await
                .context("S1/S2/S3 scale benchmark")?,
        );
        phase("S1/S2/S3 scale", t);
    }

    // P rows by number (P1, P1w, P2, ...), then the S rows.
    let order = |id: &str| -> (bool, u32, String) {
        let digits: String = id.chars().filter(char::is_ascii_digit).collect();
        (
            id.starts_with('S'),
            digits.parse().unwrap_or(99),
            id.to_owned(),
        )
    };
    report.rows.sort_by_key(|r| order(r.id));
    Ok(report)
}
