//! Concurrency: 32 clients writing and reading the same 4 keys while GC runs every 100 ms, and a
//! seeded model test of the ingest/overwrite/GC protocol against `DedupStore` on the disk store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::primitives::ByteStream;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use spotrun_cache_proxy::dedup::manifest::Segment;
use spotrun_cache_proxy::dedup::{DedupStore, GcOptions, NewObject};
use spotrun_cache_proxy::metrics::Metrics;
use spotrun_cache_proxy::store::BlobStore;
use spotrun_cache_proxy::store::disk::DiskStore;

use crate::common::{BUCKET, Backend, Proxy, noise, sha256};

/// Seconds the 32-client run lasts (the issue asks for 30; CI defaults to 10 to stay quick).
fn duration() -> Duration {
    Duration::from_secs(
        std::env::var("SPOTRUN_CONCURRENCY_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    )
}

const KEYS: [&str; 4] = ["project/1/a", "project/1/b", "project/1/c", "project/1/d"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_clients_on_four_keys_with_gc_running() {
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.gc_interval = Some(Duration::from_millis(100));
        // Short grace so GC really sweeps overwritten versions while clients run.
        s.gc_grace = Duration::from_secs(1);
    })
    .await;
    // Every version ever started per key (registered before its PUT begins).
    let versions: Arc<Mutex<HashMap<&'static str, HashSet<String>>>> = Arc::default();
    let (reads, cut_reads, writes, misses) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let deadline = Instant::now() + duration();
    let mut tasks = Vec::new();
    for w in 0..32u64 {
        let c = proxy.client();
        let versions = versions.clone();
        let (reads, cut_reads, writes, misses) = (
            reads.clone(),
            cut_reads.clone(),
            writes.clone(),
            misses.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let key = KEYS[rng.random_range(0..KEYS.len())];
                if rng.random_bool(0.4) {
                    let body = noise(rng.random_range(1..(384 << 10)), (w << 32) | n);
                    versions
                        .lock()
                        .unwrap()
                        .entry(key)
                        .or_default()
                        .insert(sha256(&body));
                    c.put_object()
                        .bucket(BUCKET)
                        .key(key)
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .unwrap();
                    writes.fetch_add(1, Ordering::Relaxed);
                } else {
                    let res = c.get_object().bucket(BUCKET).key(key).send().await;
                    let out = match res {
                        Ok(o) => o,
                        Err(e) => {
                            let code = e.into_service_error().meta().code().map(str::to_owned);
                            assert_eq!(code.as_deref(), Some("NoSuchKey"));
                            misses.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let len = out.content_length().unwrap();
                    match out.body.collect().await {
                        Ok(b) => {
                            let b = b.into_bytes();
                            assert_eq!(b.len() as i64, len);
                            let sha = sha256(&b);
                            assert!(
                                versions.lock().unwrap()[key].contains(&sha),
                                "{key}: a read returned bytes that are no single version"
                            );
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        // A cut body is an error to the client, never a wrong body.
                        Err(_) => {
                            cut_reads.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (r, cut, w, m) = (
        reads.load(Ordering::Relaxed),
        cut_reads.load(Ordering::Relaxed),
        writes.load(Ordering::Relaxed),
        misses.load(Ordering::Relaxed),
    );
    println!("{w} writes, {r} whole reads, {cut} cut reads, {m} not-yet-written misses");
    assert!(w > 0 && r > 0);
    // Quiet now: GC has run many times; every key reads back whole, from packs that exist.
    for key in KEYS {
        let out = proxy
            .client()
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
        let b = out.body.collect().await.unwrap().into_bytes();
        assert!(versions.lock().unwrap()[key].contains(&sha256(&b)));
    }
}

fn obj(key: &str) -> NewObject {
    NewObject {
        bucket: "b".into(),
        key: key.into(),
        etag: "\"e\"".into(),
        content_type: None,
        metadata: vec![],
        attrs: spotrun_cache_proxy::dedup::manifest::ObjectAttrs::default(),
    }
}

/// Bodies built from a small pool of blocks, so versions share chunks (dedup hits on packs that
/// overwrites just made unreferenced: the case GC must not break).
fn body_from(rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    let blocks = rng.random_range(0..5);
    (0..blocks)
        .flat_map(|_| noise(96 << 10, rng.random_range(0..6)))
        .collect()
}

async fn read_all(s: &Arc<DedupStore>, key: &str) -> Option<Vec<u8>> {
    let m = s.manifest("b", key).await.unwrap()?;
    let size = m.header.size;
    let mut out = Vec::new();
    let mut st = std::pin::pin!(s.read(m, 0, size));
    while let Some(b) = st.next().await {
        out.extend_from_slice(&b.expect("a live manifest's chunks are all there"));
    }
    Some(out)
}

/// Seeded, bounded model test: rounds of concurrent ingests (distinct keys, some overwriting) raced
/// against the most aggressive GC (grace 0, clock a day ahead); after each round the store must
/// match the model exactly and every live manifest's packs must exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_protocol_model() {
    let seeds: Vec<u64> = match std::env::var("SPOTRUN_GC_MODEL_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => vec![1, 2, 3],
    };
    for seed in seeds {
        let dir = tempfile::tempdir().unwrap();
        let blob = Arc::new(DiskStore::open(dir.path().join("data")).unwrap());
        let store = Arc::new(
            DedupStore::open(
                blob.clone(),
                dir.path().join("spool"),
                Arc::new(Metrics::default()),
            )
            .await
            .unwrap(),
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut model: HashMap<String, Vec<u8>> = HashMap::new();
        let keys = ["k0", "k1", "k2", "k3", "k4", "k5"];
        for round in 0..40 {
            let mut picked: Vec<&str> = keys.to_vec();
            let n = rng.random_range(1..=3);
            let mut batch = Vec::new();
            for _ in 0..n {
                let key = picked.swap_remove(rng.random_range(0..picked.len()));
                batch.push((key.to_owned(), body_from(&mut rng)));
            }
            let gcs = rng.random_range(0..=2);
            let mut tasks = Vec::new();
            for (key, body) in &batch {
                let (s, key, body) = (store.clone(), key.clone(), body.clone());
                tasks.push(tokio::spawn(async move {
                    s.put_bytes(body.into(), obj(&key)).await.unwrap();
                }));
            }
            for _ in 0..gcs {
                let s = store.clone();
                tasks.push(tokio::spawn(async move {
                    let opts = GcOptions {
                        expire_uploads: std::time::Duration::from_secs(7 * 86_400),
                        durable_buckets: Vec::new(),
                        grace: Duration::ZERO,
                        expire_unread: None,
                        max_logical_bytes: None,
                        now: SystemTime::now() + Duration::from_hours(24),
                    };
                    s.gc(&opts).await.unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            for (key, body) in batch {
                model.insert(key, body);
            }
            // Invariants: the store equals the model, and manifests reference only existing packs.
            for key in keys {
                let got = read_all(&store, key).await;
                assert_eq!(
                    got.as_ref().map(|b| sha256(b)),
                    model.get(key).map(|b| sha256(b)),
                    "seed {seed} round {round} key {key}"
                );
            }
            for info in blob.list("manifests/").await.unwrap() {
                let m = spotrun_cache_proxy::dedup::manifest::Manifest::decode(
                    blob.get(&info.key).await.unwrap(),
                )
                .unwrap();
                for seg in &store.all_segments(Arc::new(m.clone())).await.unwrap() {
                    if let Segment::Chunk(c) = seg {
                        let pack = &m.header.packs[c.pack as usize];
                        assert!(
                            blob.head(pack).await.unwrap().is_some(),
                            "seed {seed} round {round}: {pack} missing"
                        );
                    }
                }
            }
        }
        // A final sweep leaves exactly the referenced packs.
        let opts = GcOptions {
            expire_uploads: std::time::Duration::from_secs(7 * 86_400),
            durable_buckets: Vec::new(),
            grace: Duration::ZERO,
            expire_unread: None,
            max_logical_bytes: None,
            now: SystemTime::now() + Duration::from_hours(24),
        };
        // The first run condemns what is unreferenced, the second deletes it.
        store.gc(&opts).await.unwrap();
        let r = store.gc(&opts).await.unwrap();
        assert_eq!(r.packs_condemned, 0);
        assert_eq!(r.packs_kept, blob.list("packs/").await.unwrap().len());
        assert!(blob.list("condemned/").await.unwrap().is_empty());
        for (key, body) in &model {
            assert_eq!(
                read_all(&store, key).await.as_deref(),
                Some(body.as_slice())
            );
        }
    }
}
