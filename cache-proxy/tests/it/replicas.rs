//! Two replicas on one s3s-fs backend: one ingests, overwrites and reads while the other runs GC in
//! a loop with a short grace period (the safety rule `grace > upload + condemned refresh` scaled
//! down). Seeded (`SPOTRUN_REPLICA_SEED`): no manifest ever references a missing pack and every GET
//! is byte-identical to a version that was written, or 404.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use spotrun_cache_proxy::dedup::manifest::{Manifest, Segment};
use spotrun_cache_proxy::dedup::{DedupError, DedupStore, GcOptions, NewObject};
use spotrun_cache_proxy::metrics::Metrics;
use spotrun_cache_proxy::store::BlobStore;
use spotrun_cache_proxy::store::s3::{S3Auth, S3Settings, S3Store};
use spotrun_testkit::s3peer::S3Peer;

use crate::common::{noise, sha256};

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

async fn replica(peer: &S3Peer, spool: &std::path::Path) -> Arc<DedupStore> {
    let blob: Arc<dyn BlobStore> = Arc::new(S3Store::new(&S3Settings {
        endpoint: peer.endpoint(),
        region: "us-east-1".into(),
        bucket: "shared".into(),
        prefix: "cache/".into(),
        path_style: true,
        auth: S3Auth::Keys {
            access_key_id: peer.access_key.clone(),
            secret_access_key: peer.secret_key.clone(),
        },
        max_concurrency: 8,
        request_timeout: Duration::from_secs(20),
    }));
    let s = DedupStore::open(blob, spool.to_owned(), Arc::new(Metrics::default()))
        .await
        .unwrap();
    s.set_condemned_refresh(Duration::from_millis(200));
    Arc::new(s)
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

/// Bodies share blocks, so replicas reuse each other's packs (and packs GC just condemned).
fn body(rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    (0..rng.random_range(1..4))
        .flat_map(|_| noise(96 << 10, rng.random_range(0..8)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_collecting_never_break_each_others_manifests() {
    crate::common::capture_logs();
    let seed: u64 = std::env::var("SPOTRUN_REPLICA_SEED").map_or(7, |s| s.parse().unwrap());
    let peer = S3Peer::start(&["shared"]).expect("s3s-fs must be installed");
    spotrun_testkit::logcapture::register_secret(&peer.secret_key);
    let dir = tempfile::tempdir().unwrap();
    let a = replica(&peer, &dir.path().join("a")).await;
    let b = replica(&peer, &dir.path().join("b")).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let (b, stop) = (b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut runs = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let opts = GcOptions {
                    expire_uploads: std::time::Duration::from_secs(7 * 86_400),
                    durable_buckets: Vec::new(),
                    grace: Duration::from_millis(1500),
                    expire_unread: None,
                    max_logical_bytes: None,
                    now: SystemTime::now(),
                };
                b.gc(&opts).await.unwrap();
                b.refresh_index().await.unwrap();
                runs += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            runs
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut written: HashMap<String, Vec<String>> = HashMap::new();
    let keys = ["k0", "k1", "k2", "k3"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    let mut ops = 0u32;
    let mut retried = 0u32;
    while tokio::time::Instant::now() < deadline {
        let key = keys[rng.random_range(0..keys.len())];
        // Which replica acts: mostly `a`, sometimes the collecting one.
        let s = if rng.random_bool(0.8) { &a } else { &b };
        if rng.random_bool(0.6) {
            let body = body(&mut rng);
            let mut attempt = 0;
            loop {
                match s.put_bytes(Bytes::from(body.clone()), obj(key)).await {
                    Ok(_) => break,
                    // Retryable by design (503 SlowDown to the client): it forgot the gone pack.
                    Err(DedupError::ReusedPacksGone(_)) if attempt < 3 => {
                        attempt += 1;
                        retried += 1;
                    }
                    Err(e) => panic!("seed {seed} op {ops}: put {key}: {e}"),
                }
            }
            written
                .entry(key.to_owned())
                .or_default()
                .push(sha256(&body));
        } else if let Some(got) = read_all(s, key).await {
            assert!(
                written.get(key).is_some_and(|v| v.contains(&sha256(&got))),
                "seed {seed} op {ops}: {key} read back bytes that were never written"
            );
        }
        ops += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = tokio::time::timeout(Duration::from_secs(30), collector)
        .await
        .expect("gc loop stops")
        .unwrap();
    assert!(runs >= 3, "gc ran {runs} times");
    // The last write of every key reads back, from both replicas, and every manifest's packs exist.
    let blob = a.blob().clone();
    for info in blob.list("manifests/").await.unwrap() {
        let m = Manifest::decode(blob.get(&info.key).await.unwrap()).unwrap();
        for seg in a.all_segments(Arc::new(m.clone())).await.unwrap() {
            if let Segment::Chunk(c) = seg {
                let pack = &m.header.packs[c.pack as usize];
                assert!(
                    blob.head(pack).await.unwrap().is_some(),
                    "seed {seed}: {} references missing {pack}",
                    m.header.key
                );
            }
        }
    }
    for key in keys {
        if let Some(last) = written.get(key).and_then(|v| v.last()) {
            for s in [&a, &b] {
                let got = read_all(s, key).await.expect("written keys exist");
                assert_eq!(&sha256(&got), last, "seed {seed}: {key}");
            }
        }
    }
    eprintln!("seed {seed}: {ops} operations, {runs} gc runs, {retried} retried puts");
}
