//! boto3 as an independent `SigV4` signer: its presigned URLs work, and every tampered variant fails.

use std::process::Command;
use std::time::Duration;

use crate::common::{AK, BUCKET, Backend, Proxy, SK, noise, presign, raw, sha256, target_of};

const SCRIPT: &str = r"
import sys
try:
    import boto3
    from botocore.config import Config
except ImportError as e:
    sys.stderr.write('boto3 is required for these tests: pip install boto3 (%s)\n' % e)
    sys.exit(3)
endpoint, ak, sk, bucket, key, expires = sys.argv[1:7]
s3 = boto3.client('s3', endpoint_url=endpoint, aws_access_key_id=ak, aws_secret_access_key=sk,
                  region_name='us-east-1',
                  config=Config(signature_version='s3v4', s3={'addressing_style': 'path'}))
for op in ('get_object', 'head_object', 'put_object'):
    print(s3.generate_presigned_url(op, Params={'Bucket': bucket, 'Key': key}, ExpiresIn=int(expires)))
";

/// (GET, HEAD, PUT) presigned URLs from boto3. Fails loudly if python3/boto3 are missing (CI installs them).
fn boto3_presign(endpoint: &str, key: &str, expires: u64) -> (String, String, String) {
    let out = Command::new("python3")
        .args([
            "-c",
            SCRIPT,
            endpoint,
            AK,
            SK,
            BUCKET,
            key,
            &expires.to_string(),
        ])
        .output()
        .expect("python3 is required for the boto3 signer tests");
    assert!(
        out.status.success(),
        "boto3 presigning failed (is boto3 installed? pip install boto3): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().map(str::to_owned);
    (
        lines.next().unwrap(),
        lines.next().unwrap(),
        lines.next().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_presigned_get_head_put_range() {
    let proxy = Proxy::start(Backend::Disk).await;
    let key = "project/9/ruby gems+v1";
    let (get, head, put) = boto3_presign(&proxy.endpoint(), key, 600);
    let body = noise(2 << 20, 9);
    let r = raw(proxy.addr, "PUT", &target_of(&put), &[], &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = raw(proxy.addr, "HEAD", &target_of(&head), &[], b"").await;
    assert_eq!(
        (r.status, r.header("content-length")),
        (200, Some(body.len().to_string().as_str()))
    );
    let r = raw(proxy.addr, "GET", &target_of(&get), &[], b"").await;
    assert_eq!(sha256(&r.body), sha256(&body));
    let r = raw(
        proxy.addr,
        "GET",
        &target_of(&get),
        &[("Range", "bytes=100-199")],
        b"",
    )
    .await;
    assert_eq!((r.status, r.body.as_slice()), (206, &body[100..200]));
}

fn tamper_query(target: &str, name: &str, f: impl Fn(&str) -> String) -> String {
    let (path, query) = target.split_once('?').unwrap();
    let q: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, v)) if k == name => format!("{k}={}", f(v)),
            _ => p.to_owned(),
        })
        .collect();
    format!("{path}?{}", q.join("&"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_presigned_urls_are_rejected_with_s3_codes() {
    let proxy = Proxy::start(Backend::Disk).await;
    let key = "project/9/main";
    proxy
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(b"content".to_vec().into())
        .send()
        .await
        .unwrap();
    let (get, _, _) = boto3_presign(&proxy.endpoint(), key, 600);
    let get = target_of(&get);
    assert_eq!(raw(proxy.addr, "GET", &get, &[], b"").await.status, 200);

    let flip = |v: &str| {
        let mut s = v.to_owned();
        let last = if s.ends_with('0') { '1' } else { '0' };
        s.pop();
        s.push(last);
        s
    };
    let cases: Vec<(&str, String, &str, Vec<(&str, &str)>, u16, &str)> = vec![
        (
            "signature",
            tamper_query(&get, "X-Amz-Signature", flip),
            "GET",
            vec![],
            403,
            "SignatureDoesNotMatch",
        ),
        (
            "expires",
            tamper_query(&get, "X-Amz-Expires", |_| "601".into()),
            "GET",
            vec![],
            403,
            "SignatureDoesNotMatch",
        ),
        (
            "date",
            // Another second of the same minute (never the signed one: a URL signed at :00 stays :00
            // otherwise, and the "tampered" URL would be the valid one, 1 run in 60).
            tamper_query(&get, "X-Amz-Date", |v| {
                let secs = if v.ends_with("00Z") { "01" } else { "00" };
                format!("{}{secs}Z", &v[..v.len() - 3])
            }),
            "GET",
            vec![],
            403,
            "SignatureDoesNotMatch",
        ),
        (
            "key",
            get.replacen("/main?", "/mainx?", 1),
            "GET",
            vec![],
            403,
            "SignatureDoesNotMatch",
        ),
        (
            "extra query parameter",
            format!("{get}&x-id=GetObject"),
            "GET",
            vec![],
            403,
            "SignatureDoesNotMatch",
        ),
        (
            "host",
            get.clone(),
            "GET",
            vec![("Host", "evil.example:9000")],
            403,
            "SignatureDoesNotMatch",
        ),
        (
            "method",
            get.clone(),
            "PUT",
            vec![],
            403,
            "SignatureDoesNotMatch",
        ),
        (
            "credential region",
            tamper_query(&get, "X-Amz-Credential", |v| {
                v.replace("us-east-1", "eu-west-1")
            }),
            "GET",
            vec![],
            400,
            "AuthorizationQueryParametersError",
        ),
        (
            "unknown access key",
            tamper_query(&get, "X-Amz-Credential", |v| {
                v.replacen("runner-key", "nobody", 1)
            }),
            "GET",
            vec![],
            403,
            "InvalidAccessKeyId",
        ),
    ];
    for (what, target, method, headers, status, code) in cases {
        let r = raw(proxy.addr, method, &target, &headers, b"").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (status, code),
            "tampered {what}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // HEAD with a GET signature: 403 without a body.
    assert_eq!(raw(proxy.addr, "HEAD", &get, &[], b"").await.status, 403);

    // Over the 7-day maximum.
    let (long, _, _) = boto3_presign(&proxy.endpoint(), key, 604_801);
    let r = raw(proxy.addr, "GET", &target_of(&long), &[], b"").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "AuthorizationQueryParametersError")
    );

    // Expired.
    let (short, _, _) = boto3_presign(&proxy.endpoint(), key, 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = raw(proxy.addr, "GET", &target_of(&short), &[], b"").await;
    assert_eq!((r.status, r.error_code().as_str()), (403, "AccessDenied"));
    assert!(String::from_utf8_lossy(&r.body).contains("Request has expired"));

    // A signed x-amz-meta header (SDK presigned PUT, like the runner's s3v2 adapter): missing or changed.
    let c = proxy.client();
    let (put, h) = presign(&c, "PUT", key, Some(("cachekey", "main"))).await;
    assert!(
        h.iter().any(|(k, _)| k == "x-amz-meta-cachekey"),
        "the SDK signs the metadata header"
    );
    let r = raw(proxy.addr, "PUT", &put, &[], b"x").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (403, "AccessDenied"),
        "missing signed header"
    );
    let r = raw(
        proxy.addr,
        "PUT",
        &put,
        &[("x-amz-meta-cachekey", "other")],
        b"x",
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (403, "SignatureDoesNotMatch"),
        "changed signed header"
    );
    // Nothing above overwrote the object.
    let r = raw(proxy.addr, "GET", &get, &[], b"").await;
    assert_eq!(r.body, b"content");
}
