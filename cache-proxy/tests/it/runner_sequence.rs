//! gitlab-runner's cache request sequence (reference/cache.md §1.4) against the proxy.

use aws_sdk_s3::primitives::ByteStream;

use crate::common::{BUCKET, Backend, Proxy, noise, presign, raw, sha256};

const CHUNK: u64 = 16 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_save_restore_with_parallel_ranges_pinned_to_one_version() {
    let proxy = Proxy::start(Backend::Disk).await;
    let c = proxy.client();
    let primary = "project/42/ruby-gems-v1-4-protected";
    let alternate = "project/42/ab/0123456789abcdef";

    // Restore on an empty cache: both HEADs and the GET are 404 (a miss, never 403).
    for key in [primary, alternate] {
        let (t, _) = presign(&c, "HEAD", key, None).await;
        assert_eq!(raw(proxy.addr, "HEAD", &t, &[], b"").await.status, 404);
    }
    let (get_t, _) = presign(&c, "GET", primary, None).await;
    let r = raw(proxy.addr, "GET", &get_t, &[], b"").await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "NoSuchKey"));

    // Save: PUT with the signed cachekey header, Content-Type and the (unsigned) Last-Modified header.
    let body = noise(34 << 20, 42);
    let (put_t, signed) = presign(
        &c,
        "PUT",
        primary,
        Some(("cachekey", "ruby-gems-v1-4-protected")),
    )
    .await;
    let mut headers: Vec<(&str, &str)> = signed
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    headers.push(("Content-Type", "application/octet-stream"));
    headers.push(("Last-Modified", "Wed, 25 Nov 2026 10:00:00 GMT"));
    let r = raw(proxy.addr, "PUT", &put_t, &headers, &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Restore: HEADs give Last-Modified, Content-Length, ETag and metadata.
    let (head_t, _) = presign(&c, "HEAD", primary, None).await;
    let h = raw(proxy.addr, "HEAD", &head_t, &[], b"").await;
    assert_eq!(h.status, 200);
    assert_eq!(
        h.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert!(
        h.header("last-modified")
            .is_some_and(|v| httpdate::parse_http_date(v).is_ok())
    );
    assert!(
        h.header("etag")
            .is_some_and(|v| v.starts_with('"') && v.len() == 34)
    );
    assert_eq!(
        h.header("x-amz-meta-cachekey"),
        Some("ruby-gems-v1-4-protected")
    );

    // Parallel mode: a bytes=0-0 probe, then 16 MiB ranges on the same URL.
    let probe = raw(proxy.addr, "GET", &get_t, &[("Range", "bytes=0-0")], b"").await;
    assert_eq!(probe.status, 206);
    let total: u64 = probe
        .header("content-range")
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(total, body.len() as u64);

    let first = raw(
        proxy.addr,
        "GET",
        &get_t,
        &[("Range", &format!("bytes=0-{}", CHUNK - 1))],
        b"",
    )
    .await;
    // Another job overwrites the key mid-download; this URL must keep serving the version it started with.
    c.put_object()
        .bucket(BUCKET)
        .key(primary)
        .body(ByteStream::from(noise(1 << 20, 7)))
        .send()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    let mut start = CHUNK;
    while start < total {
        let end = (start + CHUNK).min(total) - 1;
        let (addr, t) = (proxy.addr, get_t.clone());
        tasks.push(tokio::spawn(async move {
            raw(
                addr,
                "GET",
                &t,
                &[("Range", &format!("bytes={start}-{end}"))],
                b"",
            )
            .await
        }));
        start += CHUNK;
    }
    let mut assembled = first.body;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 206);
        assembled.extend_from_slice(&r.body);
    }
    assert_eq!(
        sha256(&assembled),
        sha256(&body),
        "ranges of one URL must come from one version"
    );

    // A fresh URL sees the new version.
    let (fresh, _) = presign(&c, "GET", primary, None).await;
    assert_eq!(
        raw(proxy.addr, "GET", &fresh, &[], b"").await.body,
        noise(1 << 20, 7)
    );
}
