//! P5 (stored bytes for versions with 5 % churn) and P6 (re-use after an mtime-only change), on the
//! dedup store with its local-disk backend and generated dependency-tree archives.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, ensure};
use futures::StreamExt;
use spotrun_cache_proxy::dedup::{DedupStore, NewObject};
use spotrun_cache_proxy::metrics::Metrics;
use spotrun_cache_proxy::store::disk::DiskStore;
use spotrun_testkit::ziptree::{Tree, new_entry_bytes};

use crate::MIB;
use crate::report::{Goal, Plot, Row, Series};

async fn open(dir: &Path) -> anyhow::Result<(Arc<DedupStore>, Arc<Metrics>)> {
    let metrics = Arc::new(Metrics::default());
    let blob = Arc::new(DiskStore::open(dir.join("data"))?);
    let store = DedupStore::open(blob, dir.join("spool-in"), metrics.clone()).await?;
    Ok((Arc::new(store), metrics))
}

/// Store `body` under `key`, then read it back and compare.
async fn put(store: &Arc<DedupStore>, key: &str, body: &[u8]) -> anyhow::Result<()> {
    let obj = NewObject {
        bucket: "runner-cache".into(),
        key: key.into(),
        etag: "\"bench\"".into(),
        content_type: None,
        metadata: Vec::new(),
        attrs: spotrun_cache_proxy::dedup::manifest::ObjectAttrs::default(),
    };
    store
        .put_bytes(bytes::Bytes::copy_from_slice(body), obj)
        .await?;
    let m = store
        .manifest("runner-cache", key)
        .await?
        .context("manifest just written")?;
    let mut read = Vec::with_capacity(body.len());
    let mut s = std::pin::pin!(store.read(m, 0, body.len() as u64));
    while let Some(b) = s.next().await {
        read.extend_from_slice(&b?);
    }
    ensure!(read == body, "{key} did not read back byte-identical");
    Ok(())
}

/// P5: `versions` archives of a `files`-file tree, 5 % of the files changed between versions, each
/// under its own key (so all stay live). Returns the rows (P5, P5i) and the stored-bytes plot.
pub async fn versions(files: usize, versions: u32) -> anyhow::Result<(Vec<Row>, Plot)> {
    let dir = tempfile::tempdir()?;
    let (store, metrics) = open(dir.path()).await?;
    let mut tree = Tree::new(files);
    let mut seen = HashSet::new();
    let (mut one_version, mut ideal, mut naive) = (0u64, 0u64, 0u64);
    let (mut stored_series, mut ideal_series, mut naive_series) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut stored = 0;
    for v in 0..versions {
        if v > 0 {
            tree.churn(5, 1000 + u64::from(v), u8::try_from(v).unwrap_or(u8::MAX));
        }
        let z = tree.zip();
        let new_data = new_entry_bytes(&z, &mut seen);
        if v == 0 {
            one_version = z.len() as u64;
            ideal = one_version;
        } else {
            ideal += new_data;
        }
        naive += z.len() as u64;
        put(&store, &format!("project/1/deps-v{v}"), &z).await?;
        stored = store.stats().await?.stored_bytes;
        let x = f64::from(v + 1);
        let mib = |b: u64| b as f64 / MIB as f64;
        stored_series.push((x, mib(stored)));
        ideal_series.push((x, mib(ideal)));
        naive_series.push((x, mib(naive)));
    }
    let ratio = stored as f64 / one_version as f64;
    let floor = ideal as f64 / one_version as f64;
    // Where the bytes above the ideal are: packs (chunk data), manifests (with their inline zip
    // structure and one 32-byte SHA-256 per chunk reference), pack index objects.
    let mut by_prefix = Vec::new();
    for prefix in ["packs/", "manifests/", "mbodies/", "packidx/"] {
        let objects = store.blob().list(prefix).await?;
        by_prefix.push((prefix, objects.iter().map(|o| o.size).sum::<u64>()));
    }
    let kib = |b: u64| b as f64 / 1024.0;
    let breakdown = by_prefix
        .iter()
        .map(|(p, n)| format!("{} {:.0} KiB", p.trim_end_matches('/'), kib(*n)))
        .collect::<Vec<_>>()
        .join(", ");
    // Segment streams stored as deltas against an earlier version's (issue 14).
    let deltas = metrics.segment_deltas.load(Ordering::Relaxed);
    let fresh = fresh_process_versions(files, versions).await?;
    let rows = vec![
        Row {
            id: "P5",
            measure: format!("stored bytes, {versions} versions with 5 % churn ÷ one version"),
            value: ratio,
            unit: "×",
            goal: Goal::AtMost(1.3),
            detail: format!(
                "one version {:.2} MiB ({files} files), stored {:.2} MiB; ideal floor (one version + \
                 new entry data) {floor:.3}× — the 1.3× target is below this floor (P5i measures \
                 against it); stored: {breakdown}",
                one_version as f64 / MIB as f64,
                stored as f64 / MIB as f64,
            ),
        },
        Row {
            id: "P5i",
            measure: format!("stored bytes ÷ the ideal floor, {versions} versions with 5 % churn"),
            value: stored as f64 / ideal as f64,
            unit: "×",
            goal: Goal::AtMost(1.1),
            detail: format!(
                "ideal {:.2} MiB (one version + new entry data), stored {:.2} MiB; {deltas} of \
                 {versions} segment streams stored as deltas. One key overwritten by a fresh \
                 process per version (a restart or another replica each time): {} of {} later \
                 streams as deltas, {:.0} KiB each on average vs {:.0} KiB for the first",
                ideal as f64 / MIB as f64,
                stored as f64 / MIB as f64,
                fresh.deltas,
                versions.saturating_sub(1),
                fresh.later_kib,
                fresh.first_kib,
            ),
        },
    ];
    let plot = Plot {
        file: "storage.svg",
        title: format!("Stored bytes vs versions ({files}-file tree, 5 % churn per version)"),
        x_label: "versions stored".into(),
        y_label: "MiB".into(),
        log_x: false,
        series: vec![
            Series {
                name: "every version in full".into(),
                points: naive_series,
            },
            Series {
                name: "spotrun cache proxy".into(),
                points: stored_series,
            },
            Series {
                name: "ideal (new entry data only)".into(),
                points: ideal_series,
            },
        ],
    };
    Ok((rows, plot))
}

/// Segment streams of versions written by processes that stored none before them.
struct FreshProcesses {
    /// Later versions whose stream went in as a delta.
    deltas: u64,
    first_kib: f64,
    /// Mean stream frame of the later versions.
    later_kib: f64,
}

/// P5's churn with one key overwritten, each version by a new process on the same backend (its own
/// spool and local index): it has no base in memory, so a delta comes from the version it replaces.
async fn fresh_process_versions(files: usize, versions: u32) -> anyhow::Result<FreshProcesses> {
    let dir = tempfile::tempdir()?;
    let blob = Arc::new(DiskStore::open(dir.path().join("data"))?);
    let mut tree = Tree::new(files);
    let key = "project/1/deps";
    let (mut deltas, mut first, mut later) = (0, 0u64, 0u64);
    for v in 0..versions {
        if v > 0 {
            tree.churn(5, 1000 + u64::from(v), u8::try_from(v).unwrap_or(u8::MAX));
        }
        let metrics = Arc::new(Metrics::default());
        let spool = dir.path().join(format!("spool-{v}"));
        let store = Arc::new(DedupStore::open(blob.clone(), spool, metrics.clone()).await?);
        put(&store, key, &tree.zip()).await?;
        let m = store
            .manifest("runner-cache", key)
            .await?
            .context("manifest just written")?;
        let frame = m.header.chain.last().map_or(0, |l| u64::from(l.len));
        if v == 0 {
            first = frame;
        } else {
            later += frame;
        }
        deltas += metrics.segment_deltas.load(Ordering::Relaxed);
    }
    Ok(FreshProcesses {
        deltas,
        first_kib: first as f64 / 1024.0,
        later_kib: later as f64 / f64::from(versions.saturating_sub(1).max(1)) / 1024.0,
    })
}

/// P6: the same tree archived again with every mtime changed and no content change.
pub async fn mtime_only(files: usize) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let (store, metrics) = open(dir.path()).await?;
    let mut tree = Tree::new(files);
    put(&store, "project/1/deps", &tree.zip()).await?;
    let before = metrics.dedup_bytes.load(Ordering::Relaxed);
    tree.touch_all();
    let second = tree.zip();
    put(&store, "project/1/deps", &second).await?;
    let reused = metrics.dedup_bytes.load(Ordering::Relaxed) - before;
    Ok(Row {
        id: "P6",
        measure: "bytes re-used after an mtime-only change".into(),
        value: reused as f64 / second.len() as f64 * 100.0,
        unit: " %",
        goal: Goal::AtLeast(90.0),
        detail: format!("{reused} of {} bytes found in stored chunks", second.len()),
    })
}
