//! GitLab object storage through the proxy with the real aws-sdk-s3 client: multipart uploads that
//! stream into the dedup store, copy as a manifest copy, deletes, listings, conditional requests,
//! and S3's error codes for what clients get wrong.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};

use crate::common::{BUCKET, Backend, Proxy, noise, raw};

const MIB: usize = 1 << 20;

async fn body_of(c: &aws_sdk_s3::Client, key: &str) -> Vec<u8> {
    c.get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e:?}"))
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}

fn stored(p: &Proxy) -> u64 {
    p.metrics
        .stored_bytes_in
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn code<E: aws_sdk_s3::error::ProvideErrorMetadata>(e: &E) -> String {
    e.code().unwrap_or("").to_owned()
}

/// Multipart upload of `data` in `part` byte parts, as Workhorse's uploader does.
async fn multipart(c: &aws_sdk_s3::Client, key: &str, data: &[u8], part: usize) -> String {
    let up = c
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .content_type("application/zip")
        .metadata("origin", "workhorse")
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap().to_owned();
    let mut done = Vec::new();
    for (i, chunk) in data.chunks(part).enumerate() {
        let n = i32::try_from(i + 1).unwrap();
        let r = c
            .upload_part()
            .bucket(BUCKET)
            .key(key)
            .upload_id(&id)
            .part_number(n)
            .body(ByteStream::from(chunk.to_vec()))
            .send()
            .await
            .unwrap();
        done.push(
            CompletedPart::builder()
                .part_number(n)
                .e_tag(r.e_tag().unwrap())
                .build(),
        );
    }
    let r = c
        .complete_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await
        .unwrap();
    r.e_tag().unwrap().to_owned()
}

/// GitLab's upload flow: multipart to `tmp/uploads/<uuid>`, copy to the final path, delete the
/// temporary key, read the final key back. The copy stores no new chunk and no new pack.
async fn gitlab_flow(backend: Backend) {
    let proxy = Proxy::start(backend).await;
    let c = proxy.client();
    let data = noise(12 * MIB + 12_345, 15);
    // s3s-fs keeps each object's attributes in a file named by the base64 of the whole object
    // name, so its names are limited to about 160 bytes; real S3 and GCS allow 1,024.
    let tmp = "tmp/uploads/1764633600-4242-0001-8b1a99";
    let etag = multipart(&c, tmp, &data, 5 * MIB).await;
    assert!(etag.ends_with("-3\""), "multipart ETag {etag}");
    let head = c
        .head_object()
        .bucket(BUCKET)
        .key(tmp)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(data.len() as i64));
    assert_eq!(head.e_tag(), Some(etag.as_str()));
    assert_eq!(head.content_type(), Some("application/zip"));
    assert_eq!(head.metadata().unwrap()["origin"], "workhorse");
    let stored_before = stored(&proxy);

    let dst = "@final/8b/1a/8b1a9953/artifacts.zip";
    c.copy_object()
        .bucket(BUCKET)
        .key(dst)
        .copy_source(format!("{BUCKET}/{}", tmp.replace('@', "%40")))
        .send()
        .await
        .unwrap();
    c.delete_object()
        .bucket(BUCKET)
        .key(tmp)
        .send()
        .await
        .unwrap();
    let e = c
        .head_object()
        .bucket(BUCKET)
        .key(tmp)
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(404));
    assert_eq!(body_of(&c, dst).await, data, "final key byte-identical");
    let head = c
        .head_object()
        .bucket(BUCKET)
        .key(dst)
        .send()
        .await
        .unwrap();
    assert_eq!(head.e_tag(), Some(etag.as_str()), "a copy keeps the ETag");
    assert_eq!(head.metadata().unwrap()["origin"], "workhorse");
    assert_eq!(stored(&proxy), stored_before, "the copy stored nothing new");
    // The upload is gone: nothing left in progress.
    let ups = c
        .list_multipart_uploads()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    assert!(ups.uploads().is_empty());
    // Uploading the same artifact again stores nothing new either (dedup across keys).
    multipart(&c, "tmp/uploads/again", &data, 5 * MIB).await;
    assert_eq!(stored(&proxy), stored_before);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_upload_flow_on_disk() {
    gitlab_flow(Backend::Disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_upload_flow_on_s3s() {
    gitlab_flow(Backend::S3s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_rules_and_errors() {
    let proxy = Proxy::start(Backend::Disk).await;
    let c = proxy.client();
    let key = "backups/1764633600_2026_12_02_18.6.0_gitlab_backup.tar";
    let up = c
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap().to_owned();
    let mut etags = Vec::new();
    for (n, len) in [(1, 5 * MIB), (2, MIB), (3, MIB)] {
        let r = c
            .upload_part()
            .bucket(BUCKET)
            .key(key)
            .upload_id(&id)
            .part_number(n)
            .body(ByteStream::from(noise(len, 40 + u64::try_from(n).unwrap())))
            .send()
            .await
            .unwrap();
        etags.push(r.e_tag().unwrap().to_owned());
    }
    let parts = c
        .list_parts()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&id)
        .send()
        .await
        .unwrap();
    let sizes: Vec<(i32, i64)> = parts
        .parts()
        .iter()
        .map(|p| (p.part_number().unwrap(), p.size().unwrap()))
        .collect();
    assert_eq!(sizes, [(1, 5 << 20), (2, 1 << 20), (3, 1 << 20)]);
    let complete = |list: Vec<(i32, String)>| {
        let c = c.clone();
        let id = id.clone();
        async move {
            c.complete_multipart_upload()
                .bucket(BUCKET)
                .key(key)
                .upload_id(&id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(
                            list.into_iter()
                                .map(|(n, e)| {
                                    CompletedPart::builder().part_number(n).e_tag(&e).build()
                                })
                                .collect(),
                        ))
                        .build(),
                )
                .send()
                .await
        }
    };
    let e = complete(vec![(2, etags[1].clone()), (1, etags[0].clone())])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidPartOrder");
    let e = complete(vec![(1, etags[0].clone()), (4, etags[1].clone())])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "InvalidPart");
    let e = complete(vec![(1, etags[1].clone())]).await.unwrap_err();
    assert_eq!(code(&e), "InvalidPart", "wrong ETag for part 1");
    let e = complete(vec![
        (1, etags[0].clone()),
        (2, etags[1].clone()),
        (3, etags[2].clone()),
    ])
    .await
    .unwrap_err();
    assert_eq!(code(&e), "EntityTooSmall", "part 2 is 1 MiB and not last");
    // None of the failures published anything.
    let e = c
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(404));
    // Parts 1 and 3 (the small one last) make a valid object.
    complete(vec![(1, etags[0].clone()), (3, etags[2].clone())])
        .await
        .unwrap();
    let mut want = noise(5 * MIB, 41);
    want.extend(noise(MIB, 43));
    assert_eq!(body_of(&c, key).await, want);
    // The upload is finished: its id is unknown now.
    let e = complete(vec![(1, etags[0].clone())]).await.unwrap_err();
    assert_eq!(code(&e), "NoSuchUpload");

    // Abort: parts are refused afterwards, and the upload is no longer listed.
    let up = c
        .create_multipart_upload()
        .bucket(BUCKET)
        .key("tmp/uploads/aborted")
        .send()
        .await
        .unwrap();
    let id2 = up.upload_id().unwrap();
    let listed = c
        .list_multipart_uploads()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.uploads().len(), 1);
    assert_eq!(listed.uploads()[0].upload_id(), Some(id2));
    c.abort_multipart_upload()
        .bucket(BUCKET)
        .key("tmp/uploads/aborted")
        .upload_id(id2)
        .send()
        .await
        .unwrap();
    let e = c
        .upload_part()
        .bucket(BUCKET)
        .key("tmp/uploads/aborted")
        .upload_id(id2)
        .part_number(1)
        .body(ByteStream::from_static(b"late"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "NoSuchUpload");
    let listed = c
        .list_multipart_uploads()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    assert!(listed.uploads().is_empty());
    // A forged upload id never names a backend object.
    let e = c
        .upload_part()
        .bucket(BUCKET)
        .key(key)
        .upload_id("../../manifests")
        .part_number(1)
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e), "NoSuchUpload");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_deletes_and_pages() {
    let proxy = Proxy::start(Backend::S3s).await;
    let c = proxy.client();
    let mut keys: Vec<String> = Vec::new();
    for p in ["project/1", "project/2", "project/10"] {
        for f in ["a.zip", "b.zip", "sub/c.zip"] {
            keys.push(format!("{p}/{f}"));
        }
    }
    keys.extend(["top".to_owned(), "tmp/x y&z".to_owned()]);
    for (i, k) in keys.iter().enumerate() {
        c.put_object()
            .bucket(BUCKET)
            .key(k)
            .body(ByteStream::from(noise(100 + i, i as u64)))
            .send()
            .await
            .unwrap();
    }
    // Overwriting leaves one listing entry, with the new size.
    c.put_object()
        .bucket(BUCKET)
        .key("top")
        .body(ByteStream::from_static(b"new"))
        .send()
        .await
        .unwrap();
    let all = c.list_objects_v2().bucket(BUCKET).send().await.unwrap();
    let mut want = keys.clone();
    want.sort();
    let got: Vec<&str> = all.contents().iter().map(|o| o.key().unwrap()).collect();
    assert_eq!(got, want);
    let top = all
        .contents()
        .iter()
        .find(|o| o.key() == Some("top"))
        .unwrap();
    assert_eq!(top.size(), Some(3));

    let r = c
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("project/")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let cps: Vec<&str> = r
        .common_prefixes()
        .iter()
        .map(|p| p.prefix().unwrap())
        .collect();
    assert_eq!(cps, ["project/1/", "project/10/", "project/2/"]);
    assert!(r.contents().is_empty());

    // Pages of 2 (keys and prefixes together), resumed by continuation token.
    let mut seen = Vec::new();
    let mut token = None;
    for _ in 0..20 {
        let r = c
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix("project/1")
            .delimiter("/")
            .max_keys(2)
            .set_continuation_token(token.clone())
            .send()
            .await
            .unwrap();
        assert!(r.key_count().unwrap() <= 2);
        seen.extend(
            r.common_prefixes()
                .iter()
                .map(|p| p.prefix().unwrap().to_owned()),
        );
        seen.extend(r.contents().iter().map(|o| o.key().unwrap().to_owned()));
        token = r.next_continuation_token().map(str::to_owned);
        if !r.is_truncated().unwrap() {
            break;
        }
    }
    assert_eq!(seen, ["project/1/", "project/10/"]);
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    for _ in 0..20 {
        let r = c
            .list_objects()
            .bucket(BUCKET)
            .max_keys(4)
            .set_marker(marker.clone())
            .send()
            .await
            .unwrap();
        let page: Vec<String> = r
            .contents()
            .iter()
            .map(|o| o.key().unwrap().to_owned())
            .collect();
        marker = page.last().cloned();
        seen.extend(page);
        if !r.is_truncated().unwrap() {
            break;
        }
    }
    assert_eq!(seen, want, "V1 pages with markers");
    let r = c
        .list_objects_v2()
        .bucket(BUCKET)
        .start_after("project/2/b.zip")
        .send()
        .await
        .unwrap();
    let got: Vec<&str> = r.contents().iter().map(|o| o.key().unwrap()).collect();
    assert_eq!(got, ["project/2/sub/c.zip", "tmp/x y&z", "top"]);

    // DeleteObjects in quiet mode reports nothing; the keys are gone from GET and listings.
    let ids: Vec<ObjectIdentifier> = keys
        .iter()
        .filter(|k| k.starts_with("project/1/"))
        .map(|k| ObjectIdentifier::builder().key(k).build().unwrap())
        .collect();
    let r = c
        .delete_objects()
        .bucket(BUCKET)
        .delete(
            Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert!(r.deleted().is_empty() && r.errors().is_empty());
    c.delete_object()
        .bucket(BUCKET)
        .key("top")
        .send()
        .await
        .unwrap();
    c.delete_object()
        .bucket(BUCKET)
        .key("never-existed")
        .send()
        .await
        .unwrap();
    let r = c
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("project/1")
        .send()
        .await
        .unwrap();
    let got: Vec<&str> = r.contents().iter().map(|o| o.key().unwrap()).collect();
    assert_eq!(
        got,
        [
            "project/10/a.zip",
            "project/10/b.zip",
            "project/10/sub/c.zip"
        ]
    );
    let e = c
        .get_object()
        .bucket(BUCKET)
        .key("top")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "NoSuchKey");
    let buckets = c.list_buckets().send().await.unwrap();
    assert_eq!(buckets.buckets()[0].name(), Some(BUCKET));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_conditions_and_scopes() {
    let proxy = Proxy::start(Backend::Disk).await;
    let c = proxy.client();
    let data = noise(300_000, 77);
    let put = c
        .put_object()
        .bucket(BUCKET)
        .key("project/7/src")
        .content_type("text/plain")
        .content_disposition("attachment; filename=\"a.txt\"")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    let etag = put.e_tag().unwrap().to_owned();
    // Missing source: 404, and nothing written at the destination (never an empty copy).
    let e = c
        .copy_object()
        .bucket(BUCKET)
        .key("project/7/dst")
        .copy_source(format!("{BUCKET}/project/7/missing"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "NoSuchKey");
    assert!(
        c.head_object()
            .bucket(BUCKET)
            .key("project/7/dst")
            .send()
            .await
            .is_err()
    );
    // A source condition that fails: 412.
    let e = c
        .copy_object()
        .bucket(BUCKET)
        .key("project/7/dst")
        .copy_source(format!("{BUCKET}/project/7/src"))
        .copy_source_if_match("\"0000\"")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "PreconditionFailed");
    // REPLACE takes the request's metadata; COPY keeps the source's.
    c.copy_object()
        .bucket(BUCKET)
        .key("project/7/dst")
        .copy_source(format!("{BUCKET}/project/7/src"))
        .copy_source_if_match(&etag)
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
        .content_type("application/json")
        .metadata("k", "v")
        .send()
        .await
        .unwrap();
    let h = c
        .head_object()
        .bucket(BUCKET)
        .key("project/7/dst")
        .send()
        .await
        .unwrap();
    assert_eq!(h.content_type(), Some("application/json"));
    assert_eq!(h.metadata().unwrap()["k"], "v");
    assert_eq!(h.content_length(), Some(300_000));
    let h = c
        .head_object()
        .bucket(BUCKET)
        .key("project/7/src")
        .send()
        .await
        .unwrap();
    assert_eq!(
        h.content_disposition(),
        Some("attachment; filename=\"a.txt\"")
    );
    assert_eq!(body_of(&c, "project/7/dst").await, data);

    // Conditional GET/HEAD and PUT.
    let e = c
        .head_object()
        .bucket(BUCKET)
        .key("project/7/src")
        .if_match("\"0000\"")
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().unwrap().status().as_u16(), 412);
    let e = c
        .get_object()
        .bucket(BUCKET)
        .key("project/7/src")
        .if_none_match(&etag)
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().unwrap().status().as_u16(), 304);
    let ok = c
        .get_object()
        .bucket(BUCKET)
        .key("project/7/src")
        .if_match(&etag)
        .range("bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.content_length(), Some(10));
    let e = c
        .put_object()
        .bucket(BUCKET)
        .key("project/7/src")
        .if_none_match("*")
        .body(ByteStream::from_static(b"overwrite"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "PreconditionFailed");
    assert_eq!(body_of(&c, "project/7/src").await, data, "kept after 412");

    // A key scoped to project/7/ copies nothing from outside it, and lists only inside it.
    c.put_object()
        .bucket(BUCKET)
        .key("project/70/secret")
        .body(ByteStream::from_static(b"other project"))
        .send()
        .await
        .unwrap();
    let limited = proxy.client_with("limited", "limited-secret");
    let e = limited
        .copy_object()
        .bucket(BUCKET)
        .key("project/7/stolen")
        .copy_source(format!("{BUCKET}/project/70/secret"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "AccessDenied");
    let e = limited
        .list_objects_v2()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "AccessDenied");
    let r = limited
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("project/7/")
        .send()
        .await
        .unwrap();
    let got: Vec<&str> = r.contents().iter().map(|o| o.key().unwrap()).collect();
    assert_eq!(got, ["project/7/dst", "project/7/src"]);
    let r = limited
        .delete_objects()
        .bucket(BUCKET)
        .delete(
            Delete::builder()
                .objects(
                    ObjectIdentifier::builder()
                        .key("project/70/secret")
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.errors()[0].code(), Some("AccessDenied"));
    assert_eq!(body_of(&c, "project/70/secret").await, b"other project");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_operations_answer_501() {
    let proxy = Proxy::start(Backend::Disk).await;
    let c = proxy.client();
    c.put_object()
        .bucket(BUCKET)
        .key("k")
        .body(ByteStream::from_static(b"v"))
        .send()
        .await
        .unwrap();
    let e = c
        .get_object_tagging()
        .bucket(BUCKET)
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().unwrap().status().as_u16(), 501);
    let e = c
        .get_bucket_versioning()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().unwrap().status().as_u16(), 501);
    let up = c
        .create_multipart_upload()
        .bucket(BUCKET)
        .key("dst")
        .send()
        .await
        .unwrap();
    let e = c
        .upload_part_copy()
        .bucket(BUCKET)
        .key("dst")
        .upload_id(up.upload_id().unwrap())
        .part_number(1)
        .copy_source(format!("{BUCKET}/k"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().unwrap().status().as_u16(), 501);
    // An unauthenticated request is refused before anything else.
    let r = raw(
        proxy.addr,
        "GET",
        &format!("/{BUCKET}?list-type=2"),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 403);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksums_are_verified_kept_and_returned() {
    use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumMode};
    let proxy = Proxy::start(Backend::Disk).await;
    let c = proxy.client();
    let data = noise(700_000, 5);
    for (alg, key) in [
        (ChecksumAlgorithm::Crc32C, "sum/crc32c"),
        (ChecksumAlgorithm::Sha256, "sum/sha256"),
        (ChecksumAlgorithm::Sha1, "sum/sha1"),
        (ChecksumAlgorithm::Crc64Nvme, "sum/crc64nvme"),
    ] {
        let put = c
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .checksum_algorithm(alg.clone())
            .body(ByteStream::from(data.clone()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
        let sent = [
            put.checksum_crc32_c(),
            put.checksum_sha256(),
            put.checksum_sha1(),
            put.checksum_crc64_nvme(),
        ];
        let h = c
            .head_object()
            .bucket(BUCKET)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .unwrap();
        let got = [
            h.checksum_crc32_c(),
            h.checksum_sha256(),
            h.checksum_sha1(),
            h.checksum_crc64_nvme(),
        ];
        assert!(got.iter().any(Option::is_some), "{alg:?} returned");
        for (g, s) in got.iter().zip(sent) {
            if let (Some(g), Some(s)) = (g, s) {
                assert_eq!(g, &s, "{alg:?}");
            }
        }
        // The SDK validates the returned checksum against the body it reads.
        let body = c
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
        assert_eq!(body.as_ref(), data.as_slice());
    }
    // A wrong declared checksum: BadDigest, and nothing is stored.
    let e = c
        .put_object()
        .bucket(BUCKET)
        .key("sum/wrong")
        .checksum_crc32_c("AAAAAA==")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "BadDigest");
    let e = c
        .head_object()
        .bucket(BUCKET)
        .key("sum/wrong")
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(404));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_then_complete_dates_and_bucket_scopes() {
    use aws_sdk_s3::primitives::DateTime;
    use spotrun_cache_proxy::config::AccessKey;
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.buckets.push("gitlab-artifacts".into());
        s.access_keys.push(AccessKey {
            id: "gitlab".into(),
            secret: "gitlab-secret-0123456789".into(),
            buckets: vec!["gitlab-artifacts".into()],
            prefix: None,
        });
    })
    .await;
    let c = proxy.client();
    // Complete after abort: NoSuchUpload, and nothing published.
    let up = c
        .create_multipart_upload()
        .bucket(BUCKET)
        .key("tmp/uploads/x")
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap();
    let part = c
        .upload_part()
        .bucket(BUCKET)
        .key("tmp/uploads/x")
        .upload_id(id)
        .part_number(1)
        .body(ByteStream::from_static(b"only part"))
        .send()
        .await
        .unwrap();
    c.abort_multipart_upload()
        .bucket(BUCKET)
        .key("tmp/uploads/x")
        .upload_id(id)
        .send()
        .await
        .unwrap();
    let e = c
        .complete_multipart_upload()
        .bucket(BUCKET)
        .key("tmp/uploads/x")
        .upload_id(id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(
                    CompletedPart::builder()
                        .part_number(1)
                        .e_tag(part.e_tag().unwrap())
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "NoSuchUpload");
    assert!(
        c.head_object()
            .bucket(BUCKET)
            .key("tmp/uploads/x")
            .send()
            .await
            .is_err()
    );

    // If-Modified-Since / If-Unmodified-Since against the object's Last-Modified.
    c.put_object()
        .bucket(BUCKET)
        .key("dated")
        .body(ByteStream::from_static(b"v1"))
        .send()
        .await
        .unwrap();
    let h = c
        .head_object()
        .bucket(BUCKET)
        .key("dated")
        .send()
        .await
        .unwrap();
    let lm = *h.last_modified().unwrap();
    let before = DateTime::from_secs(lm.secs() - 3600);
    let e = c
        .get_object()
        .bucket(BUCKET)
        .key("dated")
        .if_modified_since(lm)
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().unwrap().status().as_u16(), 304);
    c.get_object()
        .bucket(BUCKET)
        .key("dated")
        .if_modified_since(before)
        .send()
        .await
        .unwrap();
    let e = c
        .get_object()
        .bucket(BUCKET)
        .key("dated")
        .if_unmodified_since(before)
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().unwrap().status().as_u16(), 412);

    // A key confined to another bucket: refused here, served in its own bucket.
    let gitlab = proxy.client_with("gitlab", "gitlab-secret-0123456789");
    let e = gitlab
        .put_object()
        .bucket(BUCKET)
        .key("project/1/cache.zip")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "AccessDenied");
    gitlab
        .put_object()
        .bucket("gitlab-artifacts")
        .key("job/1/artifacts.zip")
        .body(ByteStream::from_static(b"artifact"))
        .send()
        .await
        .unwrap();
    let limited = proxy.client_with("limited", "limited-secret");
    let e = limited
        .get_object()
        .bucket("gitlab-artifacts")
        .key("job/1/artifacts.zip")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&e.into_service_error()), "AccessDenied");
    let listed = gitlab.list_buckets().send().await.unwrap();
    let names: Vec<&str> = listed.buckets().iter().filter_map(|b| b.name()).collect();
    assert_eq!(
        names,
        ["gitlab-artifacts"],
        "ListBuckets shows the key's buckets only"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_listing_pages() {
    let proxy = Proxy::start(Backend::Disk).await;
    let c = proxy.client();
    let mut want = Vec::new();
    for key in ["a/1", "a/1", "b/2"] {
        let up = c
            .create_multipart_upload()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
        want.push((key.to_owned(), up.upload_id().unwrap().to_owned()));
    }
    want.sort();
    let (mut km, mut im) = (None::<String>, None::<String>);
    let mut seen = Vec::new();
    for _ in 0..10 {
        let r = c
            .list_multipart_uploads()
            .bucket(BUCKET)
            .max_uploads(1)
            .set_key_marker(km.clone())
            .set_upload_id_marker(im.clone())
            .send()
            .await
            .unwrap();
        for u in r.uploads() {
            seen.push((
                u.key().unwrap().to_owned(),
                u.upload_id().unwrap().to_owned(),
            ));
        }
        if !r.is_truncated().unwrap_or(false) {
            break;
        }
        km = r.next_key_marker().map(str::to_owned);
        im = r.next_upload_id_marker().map(str::to_owned);
    }
    // Uploads of one key are listed in upload-id order here (S3 orders them by initiation time).
    assert_eq!(seen, want);
    proxy.stop().await;
}
