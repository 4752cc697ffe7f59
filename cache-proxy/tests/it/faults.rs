//! Bad input and faults: disconnects, length mismatches, bad keys, backend outage, on-disk corruption.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    BUCKET, Backend, Proxy, get_body, header_auth, noise, parse_response, presign, raw, sha256,
    str_pairs,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_length_mismatch_keep_the_previous_version() {
    let proxy = Proxy::start(Backend::Disk).await;
    let key = "project/3/main";
    let v1 = noise(2 << 20, 1);
    proxy
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from(v1.clone()))
        .send()
        .await
        .unwrap();
    let (put, _) = presign(&proxy.client(), "PUT", key, None).await;

    // Client disconnects after 1 MiB of a declared 4 MiB body.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PUT {put} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
        proxy.addr,
        4 << 20
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&noise(1 << 20, 2)).await.unwrap();
    s.shutdown().await.unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp)).await;
    drop(s);
    if !resp.is_empty() {
        assert_eq!(parse_response(&resp, false).status, 400);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sha256(&get_body(&proxy, key).await),
        sha256(&v1),
        "previous version intact after a disconnect"
    );

    // aws-chunked body whose decoded length disagrees with x-amz-decoded-content-length.
    // (Header-signed: only a STREAMING-* payload hash may announce aws-chunked framing.)
    let chunked = b"5\r\nhello\r\n0\r\n\r\n";
    let streaming = |decoded_len: &'static str| {
        header_auth(
            proxy.addr,
            "PUT",
            key,
            "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            &[
                ("content-encoding", "aws-chunked"),
                ("x-amz-decoded-content-length", decoded_len),
            ],
        )
    };
    let target = format!("/{BUCKET}/{key}");
    let r = raw(
        proxy.addr,
        "PUT",
        &target,
        &str_pairs(&streaming("9")),
        chunked,
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "IncompleteBody"));
    // Truncated aws-chunked framing.
    let r = raw(
        proxy.addr,
        "PUT",
        &target,
        &str_pairs(&streaming("5")),
        b"5\r\nhel",
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "IncompleteBody"));
    // Content-MD5 that does not match.
    let r = raw(
        proxy.addr,
        "PUT",
        &put,
        &[("Content-MD5", "AAAAAAAAAAAAAAAAAAAAAA==")],
        b"data",
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "BadDigest"));
    assert_eq!(sha256(&get_body(&proxy, key).await), sha256(&v1));
    // Nothing half-written is left in the spool once the refused uploads' pipelines wound down.
    let left = || -> Vec<_> {
        std::fs::read_dir(proxy.dir.path().join("spool"))
            .unwrap()
            .filter(|e| e.as_ref().map_or(true, |e| e.file_name() != "index"))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !left().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spool = left();
    assert!(spool.is_empty(), "spool files left behind: {spool:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_signed_sha256_mismatch_is_rejected_without_storing() {
    // A header-signed request whose declared payload hash is valid hex but wrong for the body.
    let proxy = Proxy::start(Backend::Disk).await;
    let c = proxy.client();
    c.put_object()
        .bucket(BUCKET)
        .key("project/3/x")
        .body(ByteStream::from_static(b"original"))
        .send()
        .await
        .unwrap();
    let conf = c.config().to_builder().interceptor(BodySwap).build();
    let swapped = aws_sdk_s3::Client::from_conf(conf);
    let err = swapped
        .put_object()
        .bucket(BUCKET)
        .key("project/3/x")
        .body(ByteStream::from_static(b"signed body"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        err.into_service_error().meta().code(),
        Some("XAmzContentSHA256Mismatch")
    );
    assert_eq!(get_body(&proxy, "project/3/x").await, b"original");
}

/// Replaces the body after signing, keeping its length, so the signed x-amz-content-sha256 is stale.
#[derive(Debug)]
struct BodySwap;

impl aws_sdk_s3::config::Intercept for BodySwap {
    fn name(&self) -> &'static str {
        "BodySwap"
    }
    fn modify_before_transmit(
        &self,
        ctx: &mut aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _rc: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        *ctx.request_mut().body_mut() = aws_sdk_s3::primitives::SdkBody::from("forged body");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_and_unknown_bucket() {
    let proxy = Proxy::start(Backend::Disk).await;
    let long = format!("/{BUCKET}/{}", "k".repeat(1025));
    for (target, code) in [
        (format!("/{BUCKET}/a/../b"), "InvalidRequest"),
        (format!("/{BUCKET}/a/%2e%2e/b"), "InvalidRequest"),
        (format!("/{BUCKET}/a/%2E%2E"), "InvalidRequest"),
        (format!("/{BUCKET}/a%00b"), "InvalidArgument"),
        (long, "KeyTooLongError"),
        (format!("/{BUCKET}/bad%zzescape"), "InvalidURI"),
    ] {
        let r = raw(proxy.addr, "GET", &target, &[], b"").await;
        assert_eq!((r.status, r.error_code().as_str()), (400, code), "{target}");
    }
    // Unsigned requests are refused.
    let r = raw(proxy.addr, "GET", &format!("/{BUCKET}/k"), &[], b"").await;
    assert_eq!((r.status, r.error_code().as_str()), (403, "AccessDenied"));
    let err = proxy
        .client()
        .put_object()
        .bucket("nope")
        .key("k")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.into_service_error().meta().code(), Some("NoSuchBucket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gives_slow_down_and_nothing_half_written() {
    let mut proxy = Proxy::start(Backend::S3s).await;
    let key = "project/5/main";
    let v1 = noise(3 << 20, 5);
    proxy
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from(v1.clone()))
        .send()
        .await
        .unwrap();
    proxy.peer.as_mut().unwrap().kill();

    let (put, _) = presign(&proxy.client(), "PUT", key, None).await;
    let r = raw(proxy.addr, "PUT", &put, &[], &noise(1 << 20, 6)).await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "SlowDown"));
    assert_eq!(r.header("retry-after"), Some("2"));
    let (get, _) = presign(&proxy.client(), "GET", key, None).await;
    let r = raw(proxy.addr, "GET", &get, &[], b"").await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "SlowDown"));
    assert_eq!(
        raw(proxy.ops_addr, "GET", "/readyz", &[], b"").await.status,
        503
    );

    proxy.peer.as_mut().unwrap().restart().unwrap();
    assert_eq!(
        sha256(&get_body(&proxy, key).await),
        sha256(&v1),
        "the old version survives the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_on_disk_never_yields_a_complete_wrong_body() {
    let proxy = Proxy::start(Backend::Disk).await;
    let key = "project/6/main";
    let body = noise(4 << 20, 8);
    proxy
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    let packs = proxy.store_dir().join("packs");
    let pack = std::fs::read_dir(&packs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[3 << 20] ^= 0x5A;
    std::fs::write(&pack, bytes).unwrap();

    let (get, _) = presign(&proxy.client(), "GET", key, None).await;
    let r = raw(proxy.addr, "GET", &get, &[], b"").await;
    // Headers promise the full length; the body is cut short, so no client accepts it as complete.
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert!(
        r.body.len() < body.len(),
        "a corrupt chunk must abort the body"
    );
    assert_eq!(
        r.body,
        &body[..r.body.len()],
        "bytes before the corrupt chunk are still correct"
    );
    // The SDK sees an error, not a body.
    let res = proxy
        .client()
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await;
    assert!(res.is_err());
}
