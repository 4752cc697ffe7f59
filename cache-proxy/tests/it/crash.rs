//! Crash consistency of the real binary on the disk store: SIGKILL at random points during 100
//! uploads (random sizes, overwrites), restart, then every key reads as 404 or exactly one complete
//! version, no manifest points at a missing chunk, and `gc` frees what the crashes left behind.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::{Rng, SeedableRng};
use spotrun_cache_proxy::dedup::manifest::{Manifest, Segment};
use tokio::io::AsyncWriteExt;

use crate::binproxy::{BinProxy, try_raw};
use crate::common::{BUCKET, noise, sha256, target_of};

async fn presigned(c: &aws_sdk_s3::Client, method: &str, key: &str) -> String {
    let cfg =
        aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(3600)).unwrap();
    let req = if method == "PUT" {
        c.put_object()
            .bucket(BUCKET)
            .key(key)
            .presigned(cfg)
            .await
            .unwrap()
    } else {
        c.get_object()
            .bucket(BUCKET)
            .key(key)
            .presigned(cfg)
            .await
            .unwrap()
    };
    target_of(req.uri())
}

/// Every manifest decodes and every chunk it lists lies inside an existing pack.
fn check_manifests(store: &Path) -> (usize, HashSet<String>) {
    let mut referenced = HashSet::new();
    let mut n = 0;
    let mut stack = vec![store.join("manifests")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let m = Manifest::decode(std::fs::read(&p).unwrap().into())
                .unwrap_or_else(|e| panic!("manifest {} undecodable: {e}", p.display()));
            let segments = m
                .collect_segments(|k| std::fs::read(store.join(k)))
                .unwrap_or_else(|e| panic!("segments of {} undecodable: {e}", p.display()));
            n += 1;
            for seg in &segments {
                if let Segment::Chunk(c) = seg {
                    let pack = &m.header.packs[c.pack as usize];
                    let len = std::fs::metadata(store.join(pack))
                        .unwrap_or_else(|_| panic!("{} references missing {pack}", m.header.key))
                        .len();
                    assert!(c.offset + u64::from(c.len) <= len, "chunk beyond its pack");
                }
            }
            referenced.extend(m.header.packs.iter().cloned());
            referenced.extend(m.header.body.iter().cloned());
        }
    }
    (n, referenced)
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Make every file under `dir` look `age` old, so the GC grace period has passed.
fn age_files(dir: &Path, age: Duration) {
    let then = SystemTime::now() - age;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for p in files_in(&d) {
            if p.is_dir() {
                stack.push(p);
            } else {
                let f = std::fs::File::options().write(true).open(&p).unwrap();
                f.set_modified(then).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_uploads_never_leaves_a_torn_object() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinProxy::new(dir.path(), "");
    let (addr, store) = (server.addr, server.store.clone());
    server.start().await;
    let c = server.client();

    let seed: u64 = std::env::var("SPOTRUN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test seed {seed} (set SPOTRUN_CRASH_SEED to replay)");
    // Per key, in order: sha256 of every version attempted, and the index of the last acknowledged.
    let history: Arc<Mutex<HashMap<String, (Vec<String>, Option<usize>)>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut uploaders = Vec::new();
    // Four uploaders with disjoint keys, so each key's versions have one order.
    for u in 0..4u64 {
        let (c, history, done) = (c.clone(), history.clone(), done.clone());
        uploaders.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (u + 1));
            for i in 0..25u64 {
                let key = format!("project/{u}/key-{}", rng.random_range(0..5));
                let size = match rng.random_range(0..10) {
                    0 => 0,
                    1..=3 => rng.random_range(1..4096),
                    _ => rng.random_range(4096..(3 << 20)),
                };
                let body = noise(size, seed ^ (u << 32) ^ i);
                let idx = {
                    let mut h = history.lock().unwrap();
                    let e = h.entry(key.clone()).or_default();
                    e.0.push(sha256(&body));
                    e.0.len() - 1
                };
                let put = presigned(&c, "PUT", &key).await;
                if let Ok(Some(r)) = try_raw(addr, "PUT", &put, &body).await
                    && r.status == 200
                {
                    history.lock().unwrap().get_mut(&key).unwrap().1 = Some(idx);
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // While the server is down, wait a little instead of burning through the uploads.
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
            }
        }));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = 0;
    while done.load(std::sync::atomic::Ordering::SeqCst) < 100 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..400))).await;
        server.kill();
        kills += 1;
        server.start().await;
    }
    for u in uploaders {
        u.await.unwrap();
    }
    server.kill();
    println!("{kills} SIGKILLs during 100 uploads");
    assert!(kills >= 3, "the test must actually crash the server");

    // Restart and check every key.
    server.start().await;
    let history = history.lock().unwrap().clone();
    let mut found = HashMap::new();
    let mut acked = 0;
    for (key, (versions, last_ack)) in &history {
        let get = presigned(&c, "GET", key).await;
        let r = try_raw(addr, "GET", &get, b"")
            .await
            .unwrap()
            .expect("an answer");
        match r.status {
            404 => assert!(last_ack.is_none(), "{key}: an acknowledged upload was lost"),
            200 => {
                let sha = sha256(&r.body);
                let pos = versions
                    .iter()
                    .rposition(|v| *v == sha)
                    .unwrap_or_else(|| panic!("{key}: body is no version that was uploaded"));
                assert!(
                    last_ack.is_none_or(|a| versions[a..].contains(&sha)),
                    "{key}: older than the last acknowledged version (found #{pos})"
                );
                found.insert(key.clone(), sha);
            }
            s => panic!("{key}: status {s}"),
        }
        acked += usize::from(last_ack.is_some());
    }
    println!(
        "{} keys, {acked} with an acknowledged version, {} readable",
        history.len(),
        found.len()
    );
    // Regression: `gc` and `stats` run beside the serving process (the CronJob, `kubectl exec`),
    // which holds the local chunk index; they failed to open it while it served.
    let report = server.gc();
    assert_eq!(
        report["packs_deleted"], 0,
        "nothing is past grace yet: {report}"
    );
    assert_eq!(
        server.maintenance("stats")["keys"].as_u64(),
        Some(found.len() as u64)
    );
    server.kill();
    let (manifests, referenced) = check_manifests(&store);
    assert_eq!(manifests, found.len());

    // Leftovers of the crashes are freed by gc once past the grace period; live data stays.
    age_files(dir.path(), Duration::from_hours(2));
    // Two runs: the first condemns unreferenced packs (tombstones), the second, once the
    // tombstones are past grace too, deletes them.
    let report = server.gc();
    println!("gc after crashes (condemn): {report}");
    age_files(dir.path(), Duration::from_hours(2));
    let report = server.gc();
    println!("gc after crashes (delete): {report}");
    assert_eq!(report["packs_condemned"], 0, "{report}");
    let packs: HashSet<String> = files_in(&store.join("packs"))
        .iter()
        .map(|p| format!("packs/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    assert_eq!(packs, referenced, "exactly the referenced packs remain");
    assert!(
        files_in(&store.join(".tmp")).is_empty(),
        "store temp files swept"
    );
    assert!(
        files_in(&store.join(".spool"))
            .iter()
            .all(|p| p.file_name().is_some_and(|n| n == "index")),
        "spool files swept (only the local chunk index remains)"
    );
    check_manifests(&store);
    server.start().await;
    for (key, sha) in &found {
        let get = presigned(&c, "GET", key).await;
        let r = try_raw(addr, "GET", &get, b"").await.unwrap().unwrap();
        assert_eq!(
            (r.status, sha256(&r.body)),
            (200, sha.clone()),
            "{key} after gc"
        );
    }
}

/// Multipart under SIGKILL: a kill during `UploadPart` leaves that part absent (the upload goes on
/// with the others), and a kill at any point of `CompleteMultipartUpload` leaves the key absent or
/// whole, never partial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_multipart_leaves_absent_or_whole() {
    use aws_sdk_s3::primitives::ByteStream;
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    const PART: usize = 5 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinProxy::new(dir.path(), "");
    let (addr, store) = (server.addr, server.store.clone());
    server.start().await;
    let c = server.client();
    let seed: u64 = rand::random();
    println!("multipart crash seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..6u64 {
        let key = format!("backups/round-{round}.tar");
        let up = c
            .create_multipart_upload()
            .bucket(BUCKET)
            .key(&key)
            .send()
            .await
            .unwrap();
        let id = up.upload_id().unwrap().to_owned();
        let mut parts = Vec::new();
        let mut whole = Vec::new();
        for n in 1..=2 {
            let body = noise(PART, seed ^ (round << 8) ^ n);
            let r = c
                .upload_part()
                .bucket(BUCKET)
                .key(&key)
                .upload_id(&id)
                .part_number(i32::try_from(n).unwrap())
                .body(ByteStream::from(body.clone()))
                .send()
                .await
                .unwrap();
            whole.extend(body);
            parts.push((i32::try_from(n).unwrap(), r.e_tag().unwrap().to_owned()));
        }
        // Part 3 is cut by a kill: half its body sent, then the server dies.
        let cfg =
            aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(600)).unwrap();
        let put3 = c
            .upload_part()
            .bucket(BUCKET)
            .key(&key)
            .upload_id(&id)
            .part_number(3)
            .presigned(cfg)
            .await
            .unwrap();
        let target = target_of(put3.uri());
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head =
            format!("PUT {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {PART}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&noise(PART / 2, 3)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        server.kill();
        drop(s);
        server.start().await;
        let listed = c
            .list_parts()
            .bucket(BUCKET)
            .key(&key)
            .upload_id(&id)
            .send()
            .await
            .unwrap();
        let numbers: Vec<i32> = listed
            .parts()
            .iter()
            .filter_map(aws_sdk_s3::types::Part::part_number)
            .collect();
        assert_eq!(numbers, [1, 2], "round {round}: the cut part is absent");

        // Complete, killed after a random delay: absent or whole.
        let done = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|(n, e)| CompletedPart::builder().part_number(*n).e_tag(e).build())
                    .collect(),
            ))
            .build();
        let complete = {
            let (c, key, id) = (c.clone(), key.clone(), id.clone());
            tokio::spawn(async move {
                c.complete_multipart_upload()
                    .bucket(BUCKET)
                    .key(&key)
                    .upload_id(&id)
                    .multipart_upload(done)
                    .send()
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..10))).await;
        server.kill();
        let acked = complete.await.unwrap().is_ok();
        server.start().await;
        let get = presigned(&c, "GET", &key).await;
        let r = try_raw(addr, "GET", &get, b"")
            .await
            .unwrap()
            .expect("an answer");
        match r.status {
            404 => assert!(!acked, "round {round}: an acknowledged complete was lost"),
            200 => assert_eq!(
                sha256(&r.body),
                sha256(&whole),
                "round {round}: torn object"
            ),
            s => panic!("round {round}: status {s}"),
        }
        println!(
            "round {round}: complete acknowledged {acked}, key status {}",
            r.status
        );
    }
    server.kill();
    check_manifests(&store);
}
