//! One conformance suite, run against both backends: SDK calls, SDK presigned URLs over raw HTTP, errors.

use aws_sdk_s3::primitives::ByteStream;

use crate::common::{AK, BUCKET, Backend, Proxy, get_body, noise, presign, raw, sha256};

async fn suite(backend: Backend) {
    let proxy = Proxy::start(backend).await;
    let c = proxy.client();

    // PUT from memory with metadata, then GET/HEAD.
    let body = noise(3 << 20, 1);
    c.put_object()
        .bucket(BUCKET)
        .key("project/1/deps-protected")
        .metadata("cachekey", "deps-protected")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    let got = c
        .get_object()
        .bucket(BUCKET)
        .key("project/1/deps-protected")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.metadata().unwrap().get("cachekey").map(String::as_str),
        Some("deps-protected")
    );
    assert_eq!(
        got.e_tag(),
        Some(
            format!(
                "\"{}\"",
                hex::encode(<md5::Md5 as md5::Digest>::digest(&body))
            )
            .as_str()
        )
    );
    let data = got.body.collect().await.unwrap().into_bytes();
    assert_eq!(sha256(&data), sha256(&body));
    let head = c
        .head_object()
        .bucket(BUCKET)
        .key("project/1/deps-protected")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(body.len() as i64));
    assert!(head.last_modified().is_some());

    // Range through the SDK.
    let r = c
        .get_object()
        .bucket(BUCKET)
        .key("project/1/deps-protected")
        .range("bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.content_range(),
        Some(format!("bytes 1000-1999/{}", body.len()).as_str())
    );
    assert_eq!(
        r.body.collect().await.unwrap().into_bytes().as_ref(),
        &body[1000..2000]
    );

    // File body: aws-sdk-s3 sends signed aws-chunked with a CRC32 trailer over http.
    let file = proxy.dir.path().join("upload.bin");
    let fbody = noise(5 << 20, 2);
    std::fs::write(&file, &fbody).unwrap();
    c.put_object()
        .bucket(BUCKET)
        .key("project/1/file")
        .body(ByteStream::from_path(&file).await.unwrap())
        .send()
        .await
        .unwrap();
    let data = get_body(&proxy, "project/1/file").await;
    assert_eq!(sha256(&data), sha256(&fbody));

    // Overwrite: the new version wins.
    c.put_object()
        .bucket(BUCKET)
        .key("project/1/file")
        .body(ByteStream::from_static(b"v2"))
        .send()
        .await
        .unwrap();
    let data = get_body(&proxy, "project/1/file").await;
    assert_eq!(data.as_slice(), b"v2");

    // Missing key: 404 NoSuchKey (HEAD must be 404 too, never 403).
    let err = c
        .get_object()
        .bucket(BUCKET)
        .key("project/1/missing")
        .send()
        .await
        .unwrap_err();
    assert!(err.into_service_error().is_no_such_key());
    let (t, h) = presign(&c, "HEAD", "project/1/missing", None).await;
    let hv: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(raw(proxy.addr, "HEAD", &t, &hv, b"").await.status, 404);

    // Unknown bucket.
    let err = c
        .get_object()
        .bucket("other-bucket")
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.into_service_error().meta().code(), Some("NoSuchBucket"));

    // SDK presigned PUT (with signed metadata) and GET over raw HTTP, plus the runner's 0-0 probe.
    let (t, h) = presign(
        &c,
        "PUT",
        "project/1/presigned",
        Some(("cachekey", "presigned")),
    )
    .await;
    let mut hv: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    hv.push(("Content-Type", "application/octet-stream"));
    let pbody = noise(1 << 20, 3);
    let r = raw(proxy.addr, "PUT", &t, &hv, &pbody).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let (t, _) = presign(&c, "GET", "project/1/presigned", None).await;
    let r = raw(proxy.addr, "GET", &t, &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-amz-meta-cachekey"), Some("presigned"));
    assert_eq!(sha256(&r.body), sha256(&pbody));
    let r = raw(proxy.addr, "GET", &t, &[("Range", "bytes=0-0")], b"").await;
    assert_eq!(
        (r.status, r.header("content-range")),
        (206, Some(format!("bytes 0-0/{}", pbody.len()).as_str()))
    );
    assert_eq!(r.body, &pbody[..1]);
    let r = raw(proxy.addr, "GET", &t, &[("Range", "bytes=-10")], b"").await;
    assert_eq!(r.body, &pbody[pbody.len() - 10..]);
    let r = raw(
        proxy.addr,
        "GET",
        &t,
        &[("Range", format!("bytes={}-", pbody.len()).as_str())],
        b"",
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (416, "InvalidRange"));

    // Operations this proxy does not implement answer 501, never a silent success.
    let err = c
        .get_object_acl()
        .bucket(BUCKET)
        .key("project/1/file")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        err.into_service_error().meta().code(),
        Some("NotImplemented")
    );
    let err = c
        .get_bucket_policy()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        err.into_service_error().meta().code(),
        Some("NotImplemented")
    );

    // A key limited to project/7/ cannot write elsewhere.
    let limited = proxy.client_with("limited", "limited-secret");
    limited
        .put_object()
        .bucket(BUCKET)
        .key("project/7/x")
        .body(ByteStream::from_static(b"ok"))
        .send()
        .await
        .unwrap();
    let err = limited
        .put_object()
        .bucket(BUCKET)
        .key("project/8/x")
        .body(ByteStream::from_static(b"no"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.into_service_error().meta().code(), Some("AccessDenied"));
    // A wrong secret.
    let err = proxy
        .client_with(AK, "wrong")
        .get_object()
        .bucket(BUCKET)
        .key("project/7/x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        err.into_service_error().meta().code(),
        Some("SignatureDoesNotMatch")
    );

    // Metrics and health endpoints, on the operations listener.
    let m = raw(proxy.ops_addr, "GET", "/metrics", &[], b"").await;
    assert!(
        String::from_utf8_lossy(&m.body)
            .contains("spotrun_cache_requests_total{op=\"PutObject\",status=\"200\"}")
    );
    assert_eq!(
        raw(proxy.ops_addr, "GET", "/readyz", &[], b"").await.status,
        200
    );
    assert_eq!(
        raw(proxy.ops_addr, "GET", "/healthz", &[], b"")
            .await
            .status,
        200
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_disk_backend() {
    suite(Backend::Disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_s3s_fs_backend() {
    suite(Backend::S3s).await;
}
