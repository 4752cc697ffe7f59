//! Backend trouble through the in-tree fault proxy between the cache proxy and s3s-fs: latency,
//! bandwidth, resets mid-upload and mid-download, stalls. The client gets 503 `SlowDown` with
//! Retry-After or a complete, correct body; a body that cannot be completed is cut, never ended
//! cleanly; service resumes when the backend does.

use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;

use crate::common::{BUCKET, Backend, Proxy, RawResponse, noise, presign, raw, sha256};

async fn put_ok(proxy: &Proxy, key: &str, body: &[u8]) {
    proxy
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap();
}

/// GET over raw HTTP, bounded so a hang fails the test instead of blocking it.
async fn get_raw(proxy: &Proxy, key: &str) -> RawResponse {
    let (get, _) = presign(&proxy.client(), "GET", key, None).await;
    tokio::time::timeout(
        Duration::from_secs(60),
        raw(proxy.addr, "GET", &get, &[], b""),
    )
    .await
    .expect("an answer within 60 s")
}

/// The only acceptable outcomes: the exact body, a 503 `SlowDown` with Retry-After, or a 200 whose
/// body is shorter than its Content-Length (a cut connection no client accepts as complete).
/// Returns whether the body came back complete.
fn acceptable(r: &RawResponse, want: &[u8]) -> bool {
    match r.status {
        200 => {
            let promised: usize = r.header("content-length").unwrap().parse().unwrap();
            assert_eq!(promised, want.len());
            if r.body.len() == promised {
                assert_eq!(
                    sha256(&r.body),
                    sha256(want),
                    "a complete body is the right body"
                );
                true
            } else {
                assert!(r.body.len() < promised);
                assert_eq!(
                    r.body,
                    &want[..r.body.len()],
                    "bytes sent before the cut are right"
                );
                false
            }
        }
        503 => {
            assert_eq!(r.error_code(), "SlowDown");
            assert!(r.header("retry-after").is_some());
            false
        }
        other => panic!(
            "unexpected status {other}: {}",
            String::from_utf8_lossy(&r.body)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_and_bandwidth_limits_still_complete() {
    let proxy = Proxy::start(Backend::S3sFaulty).await;
    let fp = proxy.faults.as_ref().unwrap();
    // Per read of at most 16 KiB: ~2 MiB/s effective, so 3 MiB fits the 3 s request timeout.
    fp.faults.delay_ms.store(2, Ordering::SeqCst);
    fp.faults.bytes_per_sec.store(8 << 20, Ordering::SeqCst);
    let body = noise(3 << 20, 1);
    put_ok(&proxy, "project/1/slow", &body).await;
    let r = get_raw(&proxy, "project/1/slow").await;
    assert!(
        acceptable(&r, &body),
        "a slow backend within the timeout still serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_upload_gives_slow_down_and_keeps_the_old_version() {
    let proxy = Proxy::start(Backend::S3sFaulty).await;
    let fp = proxy.faults.as_ref().unwrap();
    let key = "project/2/up";
    let v1 = noise(2 << 20, 2);
    put_ok(&proxy, key, &v1).await;
    for reset in [true, false] {
        fp.faults.reset.store(reset, Ordering::SeqCst);
        fp.faults
            .cut_after_upload_bytes
            .store(512 << 10, Ordering::SeqCst);
        let (put, _) = presign(&proxy.client(), "PUT", key, None).await;
        let r = raw(proxy.addr, "PUT", &put, &[], &noise(3 << 20, 3)).await;
        assert_eq!((r.status, r.error_code().as_str()), (503, "SlowDown"));
        assert_eq!(r.header("retry-after"), Some("2"));
        fp.faults.clear();
        let got = get_raw(&proxy, key).await;
        assert!(
            acceptable(&got, &v1) && got.body == v1,
            "old version intact"
        );
    }
    assert!(fp.counters.cuts.load(Ordering::SeqCst) >= 2);
    // The backend is back: uploads work again.
    let v2 = noise(3 << 20, 4);
    put_ok(&proxy, key, &v2).await;
    assert!(acceptable(&get_raw(&proxy, key).await, &v2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_download_cuts_the_client_connection() {
    let proxy = Proxy::start(Backend::S3sFaulty).await;
    let fp = proxy.faults.as_ref().unwrap();
    let key = "project/3/down";
    let body = noise(6 << 20, 5);
    put_ok(&proxy, key, &body).await;
    for reset in [true, false] {
        fp.faults.reset.store(reset, Ordering::SeqCst);
        fp.faults
            .cut_after_download_bytes
            .store(1 << 20, Ordering::SeqCst);
        let before = fp.counters.cuts.load(Ordering::SeqCst);
        let r = get_raw(&proxy, key).await;
        assert!(
            !acceptable(&r, &body),
            "a backend cut mid-body cannot produce a complete body"
        );
        assert!(fp.counters.cuts.load(Ordering::SeqCst) > before);
        // The SDK, too, reports an error rather than a short body.
        let res = proxy
            .client()
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await;
        if let Ok(out) = res {
            assert!(out.body.collect().await.is_err());
        }
        fp.faults.clear();
    }
    let r = get_raw(&proxy, key).await;
    assert!(acceptable(&r, &body), "service resumes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_backend_is_bounded_by_the_request_timeout() {
    let proxy = Proxy::start(Backend::S3sFaulty).await;
    let fp = proxy.faults.as_ref().unwrap();
    let key = "project/4/stall";
    let body = noise(4 << 20, 6);
    put_ok(&proxy, key, &body).await;

    // Download stall after some bytes: 503 or a cut body, within the bounded wait of get_raw.
    fp.faults
        .stall_after_download_bytes
        .store(256 << 10, Ordering::SeqCst);
    let r = get_raw(&proxy, key).await;
    assert!(!acceptable(&r, &body));
    assert!(fp.counters.stalls.load(Ordering::SeqCst) >= 1);
    fp.faults.clear();

    // Upload stall: 503, nothing published.
    fp.faults
        .stall_after_upload_bytes
        .store(256 << 10, Ordering::SeqCst);
    let (put, _) = presign(&proxy.client(), "PUT", key, None).await;
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        raw(proxy.addr, "PUT", &put, &[], &noise(2 << 20, 7)),
    )
    .await
    .expect("answer within 60 s");
    assert_eq!((r.status, r.error_code().as_str()), (503, "SlowDown"));
    fp.faults.clear();
    let r = get_raw(&proxy, key).await;
    assert!(acceptable(&r, &body), "old version intact, service resumed");

    // Backend down: new connections refused, pooled ones reset on their next byte; then back.
    fp.faults.refuse.store(true, Ordering::SeqCst);
    fp.faults.reset.store(true, Ordering::SeqCst);
    fp.faults.cut_after_upload_bytes.store(1, Ordering::SeqCst);
    let (put, _) = presign(&proxy.client(), "PUT", "project/4/new", None).await;
    let r = raw(proxy.addr, "PUT", &put, &[], b"new").await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "SlowDown"));
    fp.faults.clear();
    let r = raw(proxy.addr, "PUT", &put, &[], b"new").await;
    assert_eq!(r.status, 200);
}
