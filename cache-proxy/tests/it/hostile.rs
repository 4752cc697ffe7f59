//! Hostile HTTP clients: slow headers and bodies, oversized heads, connection floods, bad encodings,
//! duplicated parameters and absurd lengths. Each is bounded or rejected, never served ambiguously.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use spotrun_cache_proxy::bodyrate::MinRate;
use spotrun_cache_proxy::chunked::MAX_TRAILERS;

use crate::common::{
    BUCKET, Backend, Proxy, header_auth, noise, parse_response, presign, raw, sha256, str_pairs,
};

/// Read until EOF, a reset, or `limit` passes (then panic): what the server sent before closing.
async fn read_until_closed(s: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server closes the connection in bounded time");
    buf
}

/// The spool holds nothing of a refused upload once its pipeline has wound down (its threads drop
/// their temporary files within moments of the refusal; bounded wait).
async fn spool_is_empty(proxy: &Proxy) -> bool {
    let spool = proxy.dir.path().join("spool");
    let empty = || {
        // The local chunk index (`index/`) is not spool.
        std::fs::read_dir(&spool).map_or(true, |d| {
            d.filter(|e| e.as_ref().map_or(true, |e| e.file_name() != "index"))
                .count()
                == 0
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !empty() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_by_the_header_timeout() {
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.http.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    // A request head that never completes.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("GET /{BUCKET}/k HTTP/1.1\r\nHost: x\r\n").as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(20)).await;
    if !got.is_empty() {
        assert_eq!(parse_response(&got, false).status, 408);
    }
    // Dribbling one header byte at a time does not extend the deadline.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let dribble = async {
        for _ in 0..200 {
            if s.write_all(b"X").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(
        dribble.await,
        "the connection was closed while headers dribbled in"
    );
    // A connection that sends nothing at all is closed as well.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    read_until_closed(&mut s, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_body_gets_request_timeout_and_keeps_the_old_version() {
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.http.body_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let key = "project/9/slow";
    proxy
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from_static(b"v1"))
        .send()
        .await
        .unwrap();
    let (put, _) = presign(&proxy.client(), "PUT", key, None).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        format!(
            "PUT {put} HTTP/1.1\r\nHost: {}\r\nContent-Length: 100000\r\n\r\n",
            proxy.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&noise(1000, 1)).await.unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(20)).await;
    let r = parse_response(&got, false);
    assert_eq!((r.status, r.error_code().as_str()), (400, "RequestTimeout"));
    let (get, _) = presign(&proxy.client(), "GET", key, None).await;
    assert_eq!(raw(proxy.addr, "GET", &get, &[], b"").await.body, b"v1");
    assert!(
        spool_is_empty(&proxy).await,
        "the partial body was not kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_reader_that_stops_reading_is_cut() {
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.http.body_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let key = "project/9/big";
    let body = noise(16 << 20, 2);
    proxy
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .unwrap();
    let (get, _) = presign(&proxy.client(), "GET", key, None).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("GET {get} HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr).as_bytes())
        .await
        .unwrap();
    // Read a little, then stop reading: socket buffers fill and the server's writes stall.
    let mut first = [0u8; 1024];
    s.read_exact(&mut first).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rest = read_until_closed(&mut s, Duration::from_secs(30)).await;
    assert!(
        1024 + rest.len() < 16 << 20,
        "the stalled download was cut, not completed ({} bytes)",
        1024 + rest.len()
    );
    // The proxy still serves.
    assert_eq!(
        raw(proxy.ops_addr, "GET", "/healthz", &[], b"")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431() {
    let proxy = Proxy::start(Backend::Disk).await;
    let target = format!("/{BUCKET}/k");
    let big = "a".repeat(200 << 10);
    let r = raw(proxy.addr, "GET", &target, &[("x-big", &big)], b"").await;
    assert_eq!(r.status, 431);
    let many: Vec<(String, String)> = (0..300)
        .map(|i| (format!("x-h{i}"), "v".to_owned()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = raw(proxy.addr, "GET", &target, &many, b"").await;
    assert_eq!(r.status, 431);
    let long_target = format!("/{BUCKET}/{}", "k".repeat(100 << 10));
    let r = raw(proxy.addr, "GET", &long_target, &[], b"").await;
    assert!(
        r.status == 431 || r.status == 414 || r.status == 400,
        "{}",
        r.status
    );
    assert_eq!(
        raw(proxy.ops_addr, "GET", "/healthz", &[], b"")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_and_idle_ones_are_evicted() {
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.http.max_connections = 2;
        s.http.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    // Two idle connections take both slots.
    let a = TcpStream::connect(proxy.addr).await.unwrap();
    let b = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    // An anonymous S3 request (403): enough to see whether the S3 port answers.
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection is not served while two are held"
    );
    drop(a);
    let got = read_until_closed(&mut c, Duration::from_secs(20)).await;
    assert_eq!(parse_response(&got, false).status, 403);
    drop(b);

    // A flood of idle connections with a short header timeout: all are evicted in bounded time and
    // service continues.
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.http.max_connections = 8;
        s.http.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        raw(proxy.addr, "GET", "/healthz", &[], b""),
    )
    .await
    .expect("served after the flood drained");
    assert_eq!(r.status, 403, "an anonymous S3 request");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_utf8_and_percent_encoding_get_s3_xml_400() {
    let proxy = Proxy::start(Backend::Disk).await;
    for target in [
        format!("/{BUCKET}/%FF%FE"),
        format!("/{BUCKET}/ok/%C3%28"),
        format!("/{BUCKET}/a%zz"),
        format!("/{BUCKET}/a%"),
        format!("/{BUCKET}/a%4"),
        format!("/{BUCKET}/k?X-Amz-Date=%FF"),
        format!("/{BUCKET}/k?X-Amz-Date=%G0"),
    ] {
        let r = raw(proxy.addr, "GET", &target, &[], b"").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "InvalidURI"),
            "{target}"
        );
        assert_eq!(r.header("content-type"), Some("application/xml"));
    }
    // Regression (found by fuzzing): a non-ASCII presigned X-Amz-Date panicked the date parser.
    let target = format!(
        "/{BUCKET}/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=runner-key%2F20250101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20250101%C3%A900000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=00"
    );
    let r = raw(proxy.addr, "GET", &target, &[], b"").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "InvalidArgument")
    );
    // Raw bytes that are not valid in a request target never reach the router.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /runner-cache/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(20)).await;
    assert_eq!(parse_response(&got, false).status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_signature_parameters_are_rejected() {
    let proxy = Proxy::start(Backend::Disk).await;
    let key = "project/9/dup";
    proxy
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from_static(b"data"))
        .send()
        .await
        .unwrap();
    let (get, _) = presign(&proxy.client(), "GET", key, None).await;
    assert_eq!(raw(proxy.addr, "GET", &get, &[], b"").await.status, 200);
    let (path, query) = get.split_once('?').unwrap();
    let sig = query
        .split('&')
        .find(|p| p.starts_with("X-Amz-Signature="))
        .unwrap();
    let bogus = format!("X-Amz-Signature={}", "0".repeat(64));
    for target in [
        format!("{get}&{bogus}"),
        format!("{path}?{bogus}&{query}"),
        format!("{get}&{sig}"),
        format!("{get}&x-amz-signature=1"),
        format!("{get}&X-Amz-Date=20250101T000000Z"),
    ] {
        let r = raw(proxy.addr, "GET", &target, &[], b"").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "InvalidArgument"),
            "{target}"
        );
    }
    let r = raw(
        proxy.addr,
        "GET",
        &get,
        &[("Range", "bytes=0-0"), ("Range", "bytes=1-1")],
        b"",
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "InvalidArgument")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_content_length_is_refused_before_spooling() {
    let proxy = Proxy::start_with(Backend::Disk, |s| s.max_object_bytes = 1 << 20).await;
    let key = "project/9/huge";
    let (put, _) = presign(&proxy.client(), "PUT", key, None).await;
    for cl in ["9223372036854775808", "1000000000000000000", "2000000"] {
        let r = raw(proxy.addr, "PUT", &put, &[("Content-Length", cl)], b"").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "EntityTooLarge"),
            "Content-Length {cl}"
        );
    }
    // u64::MAX (hyper's own sentinel) and beyond: hyper refuses the request head itself.
    for cl in ["18446744073709551615", "99999999999999999999999"] {
        let r = raw(proxy.addr, "PUT", &put, &[("Content-Length", cl)], b"").await;
        assert!(r.status == 400 || r.status == 431, "{cl}: {}", r.status);
    }
    // aws-chunked: the declared decoded length counts, and so do the bytes actually received.
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
        &str_pairs(&streaming("9223372036854775807")),
        b"0\r\n\r\n",
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "EntityTooLarge"));
    let body = noise((1 << 20) + 1, 3);
    let chunked = [
        format!("{:x}\r\n", body.len()).into_bytes(),
        body.clone(),
        b"\r\n0\r\n\r\n".to_vec(),
    ]
    .concat();
    let r = raw(
        proxy.addr,
        "PUT",
        &target,
        &str_pairs(&streaming("100")),
        &chunked,
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "EntityTooLarge"));
    assert!(spool_is_empty(&proxy).await);
    let (get, _) = presign(&proxy.client(), "GET", key, None).await;
    assert_eq!(raw(proxy.addr, "GET", &get, &[], b"").await.status, 404);
    // At the limit is fine.
    let ok = noise(1 << 20, 4);
    let r = raw(proxy.addr, "PUT", &put, &[], &ok).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sha256(&raw(proxy.addr, "GET", &get, &[], b"").await.body),
        sha256(&ok)
    );
}

/// Regression (issue 16): a presigned URL signs `UNSIGNED-PAYLOAD`, yet its body was decoded as
/// aws-chunked when the request said so, trailers and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_put_cannot_choose_aws_chunked_framing() {
    let proxy = Proxy::start(Backend::Disk).await;
    let key = "project/9/framing";
    let (put, _) = presign(&proxy.client(), "PUT", key, None).await;
    let r = raw(
        proxy.addr,
        "PUT",
        &put,
        &[
            ("Content-Encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "0"),
        ],
        b"0\r\na:b\r\n\r\n",
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "InvalidArgument")
    );
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("STREAMING-"), "{body}");
    let (get, _) = presign(&proxy.client(), "GET", key, None).await;
    assert_eq!(raw(proxy.addr, "GET", &get, &[], b"").await.status, 404);
    assert!(spool_is_empty(&proxy).await);
}

/// Regression (issue 16): trailer lines were kept without limit, ~20x the bytes sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailer_flood_is_cut_at_the_trailer_limit() {
    let proxy = Proxy::start(Backend::Disk).await;
    let key = "project/9/trailers";
    let headers = header_auth(
        proxy.addr,
        "PUT",
        key,
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        &[
            ("content-encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "0"),
        ],
    );
    let target = format!("/{BUCKET}/{key}");
    // A well-formed body: the empty final chunk, 1,000 trailer lines, the closing empty line.
    let flood = [b"0\r\n".to_vec(), b"a:b\r\n".repeat(1000), b"\r\n".to_vec()].concat();
    let r = raw(proxy.addr, "PUT", &target, &str_pairs(&headers), &flood).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MalformedTrailerError")
    );
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.contains(&format!("more than {MAX_TRAILERS} trailer lines")),
        "{body}"
    );
    // What aws-sdk-s3 sends (a checksum trailer) still passes: the same framing, one trailer.
    let ok = b"0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n";
    let r = raw(proxy.addr, "PUT", &target, &str_pairs(&headers), ok).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(spool_is_empty(&proxy).await);
}

/// Regression (issue 16): the idle timeout fired only on silence, so a byte now and then held a
/// connection slot for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_below_the_minimum_rate_gets_request_timeout() {
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.http.min_upload_rate = MinRate {
            min_bytes_per_sec: 1024,
            window: Duration::from_secs(2),
        };
    })
    .await;
    let key = "project/9/dribble";
    let (put, _) = presign(&proxy.client(), "PUT", key, None).await;
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(
        format!(
            "PUT {put} HTTP/1.1\r\nHost: {}\r\nContent-Length: 100000\r\n\r\n",
            proxy.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // A byte every 200 ms: never idle for the 60 s idle timeout, far below 1 KiB/s.
    let dribbler = tokio::spawn(async move {
        for _ in 0..150 {
            if wr.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let got = read_until_closed(&mut rd, Duration::from_secs(25)).await;
    dribbler.abort();
    let r = parse_response(&got, false);
    assert_eq!((r.status, r.error_code().as_str()), (400, "RequestTimeout"));
    assert!(
        spool_is_empty(&proxy).await,
        "the partial body was not kept"
    );
}

/// Regression (issue 16): connections that never finish a request head held every slot until the
/// header timeout, and could be reopened. Now at most `max_connections_awaiting_headers` wait; the
/// longest waiter is closed when another arrives. A kept-alive connection between requests counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_request_head_get_a_bounded_share_of_slots() {
    let proxy = Proxy::start_with(Backend::Disk, |s| {
        s.http.max_connections = 8;
        s.http.max_connections_awaiting_headers = 2;
        s.http.header_read_timeout = Duration::from_secs(120);
    })
    .await;
    let key = "project/9/share";
    let (get, _) = presign(&proxy.client(), "GET", key, None).await;
    // A kept-alive connection after one complete request, then idle.
    let mut kept = TcpStream::connect(proxy.addr).await.unwrap();
    kept.write_all(format!("GET {get} HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr).as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 404");
    // More silent connections than there are slots.
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // Closed long before the 120 s header timeout: the oldest waiters make room.
    read_until_closed(&mut kept, Duration::from_secs(20)).await;
    read_until_closed(&mut idle[0], Duration::from_secs(20)).await;
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        raw(proxy.addr, "GET", &get, &[], b""),
    )
    .await
    .expect("a legitimate request is served while silent connections keep arriving");
    assert_eq!(r.status, 404);
}
