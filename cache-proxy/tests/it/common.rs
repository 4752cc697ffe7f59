//! Test fixtures: an in-process proxy over a chosen backend, an SDK client, and a raw HTTP/1.1 client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use spotrun_cache_proxy::config::{AccessKey, Settings, StoreChoice};
use spotrun_cache_proxy::metrics::Metrics;
use spotrun_cache_proxy::store::s3::S3Settings;
use spotrun_testkit::faultproxy::FaultProxy;
use spotrun_testkit::logcapture::register_secret;
use spotrun_testkit::s3peer::S3Peer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const BUCKET: &str = "runner-cache";
pub const AK: &str = "runner-key";
pub const SK: &str = "runner-secret-0123456789";

/// When `SPOTRUN_LOG_CAPTURE_DIR` is set, send the in-process proxies' logs (all levels of ours) there
/// and register the test credentials, for `spotrun-log-scan` (see `spotrun_testkit::logcapture`).
pub fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(file) = spotrun_testkit::logcapture::create("cache-proxy-it") else {
            return;
        };
        for s in [AK, SK, "limited-secret"] {
            register_secret(s);
        }
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,spotrun_cache_proxy=trace",
            ))
            .with_writer(std::sync::Mutex::new(file))
            .try_init();
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Disk,
    S3s,
    /// s3s-fs behind a [`FaultProxy`] (`Proxy::faults`), with a 3 s backend request timeout.
    S3sFaulty,
}

pub struct Proxy {
    pub addr: SocketAddr,
    /// The operations listener (`/metrics`, `/healthz`, `/readyz`).
    pub ops_addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub peer: Option<S3Peer>,
    pub faults: Option<FaultProxy>,
    pub metrics: Arc<Metrics>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> Self {
        capture_logs();
        let dir = tempfile::tempdir().unwrap();
        let mut faults = None;
        let (store, peer) = match backend {
            Backend::Disk => (StoreChoice::Disk(dir.path().join("store")), None),
            Backend::S3s | Backend::S3sFaulty => {
                let peer = S3Peer::start(&["dedup"])
                    .expect("s3s-fs must be installed for these tests (set S3S_FS or PATH)");
                register_secret(&peer.secret_key);
                let mut endpoint = peer.endpoint();
                let mut request_timeout = Duration::from_secs(20);
                if backend == Backend::S3sFaulty {
                    let fp = FaultProxy::start(peer.addr).await.unwrap();
                    endpoint = fp.endpoint();
                    request_timeout = Duration::from_secs(3);
                    faults = Some(fp);
                }
                let s = S3Settings {
                    endpoint,
                    region: "us-east-1".into(),
                    bucket: "dedup".into(),
                    prefix: "cache/".into(),
                    path_style: true,
                    auth: spotrun_cache_proxy::store::s3::S3Auth::Keys {
                        access_key_id: peer.access_key.clone(),
                        secret_access_key: peer.secret_key.clone(),
                    },
                    max_concurrency: 8,
                    request_timeout,
                };
                (StoreChoice::S3(s), Some(peer))
            }
        };
        let mut settings = Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            ops_listen: "127.0.0.1:0".parse().unwrap(),
            region: "us-east-1".into(),
            buckets: vec![BUCKET.into()],
            access_keys: vec![
                AccessKey {
                    id: AK.into(),
                    secret: SK.into(),
                    buckets: Vec::new(),
                    prefix: None,
                },
                AccessKey {
                    id: "limited".into(),
                    secret: "limited-secret".into(),
                    buckets: vec![BUCKET.into()],
                    prefix: Some("project/7/".into()),
                },
            ],
            store,
            spool_dir: dir.path().join("spool"),
            max_object_bytes: spotrun_cache_proxy::config::DEFAULT_MAX_OBJECT_BYTES,
            http: spotrun_cache_proxy::config::HttpLimits::default(),
            gc_interval: None,
            gc_grace: Duration::from_hours(1),
            expire_uploads: Duration::from_hours(7 * 24),
            durable_buckets: Vec::new(),
            tls: None,
            tls_reload_check: Duration::from_secs(10),
            expire_unread: None,
            max_logical_bytes: None,
        };
        tweak(&mut settings);
        let metrics = Arc::new(Metrics::default());
        let dedup = spotrun_cache_proxy::open_dedup(&settings, metrics.clone())
            .await
            .unwrap();
        let listeners = spotrun_cache_proxy::Listeners {
            s3: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            ops: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let addr = listeners.s3.local_addr().unwrap();
        let ops_addr = listeners.ops.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let serve_metrics = metrics.clone();
        let task = tokio::spawn(async move {
            spotrun_cache_proxy::serve(settings, dedup, serve_metrics, listeners, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            ops_addr,
            dir,
            peer,
            faults,
            metrics,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn client(&self) -> aws_sdk_s3::Client {
        self.client_with(AK, SK)
    }

    pub fn client_with(&self, ak: &str, sk: &str) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .credentials_provider(Credentials::new(ak, sk, None, None, "test"))
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("graceful shutdown")
                .unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn error_code(&self) -> String {
        let s = String::from_utf8_lossy(&self.body);
        s.split("<Code>")
            .nth(1)
            .and_then(|r| r.split("</Code>").next())
            .unwrap_or("")
            .to_owned()
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), with full control of framing.
pub async fn raw(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut req = format!("{method} {target} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        && (method == "PUT" || !body.is_empty())
    {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_mins(1), s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .ok();
    parse_response(&buf, method == "HEAD")
}

pub fn parse_response(buf: &[u8], head: bool) -> RawResponse {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("complete response head");
    let head_text = std::str::from_utf8(&buf[..end]).unwrap();
    let mut lines = head_text.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    if head {
        body.clear();
    } else if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(p) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(
            std::str::from_utf8(&b[..p])
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        if n == 0 || b.len() < p + 2 + n {
            return out;
        }
        out.extend_from_slice(&b[p + 2..p + 2 + n]);
        b = &b[(p + 4 + n).min(b.len())..];
    }
}

/// `(name, value)` pairs as the `&str` pairs [`raw`] takes.
pub fn str_pairs(h: &[(String, String)]) -> Vec<(&str, &str)> {
    h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A loopback address with a port that was free a moment ago, for a child process to listen on.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Split a presigned URL into the request target (path + query).
pub fn target_of(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    after_scheme
        .find('/')
        .map_or("/".into(), |i| after_scheme[i..].to_owned())
}

pub async fn presign(
    client: &aws_sdk_s3::Client,
    method: &str,
    key: &str,
    meta: Option<(&str, &str)>,
) -> (String, Vec<(String, String)>) {
    use aws_sdk_s3::presigning::PresigningConfig;
    // A distinct expiry per call keeps two URLs signed in the same second distinct, like two jobs' URLs.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cfg = PresigningConfig::expires_in(Duration::from_secs(3600 + n)).unwrap();
    let req = match method {
        "GET" => client
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .presigned(cfg)
            .await
            .unwrap(),
        "HEAD" => client
            .head_object()
            .bucket(BUCKET)
            .key(key)
            .presigned(cfg)
            .await
            .unwrap(),
        "PUT" => {
            let mut b = client.put_object().bucket(BUCKET).key(key);
            if let Some((k, v)) = meta {
                b = b.metadata(k, v);
            }
            b.presigned(cfg).await.unwrap()
        }
        _ => unreachable!(),
    };
    let headers = req
        .headers()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (target_of(req.uri()), headers)
}

/// The whole object, read through the SDK (panics on any error).
pub async fn get_body(proxy: &Proxy, key: &str) -> Vec<u8> {
    let c = proxy.client();
    c.get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Deterministic pseudo-random bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Headers that sign `method /BUCKET/key` with a `SigV4` `Authorization` header and the payload hash
/// `content_sha` (e.g. `STREAMING-UNSIGNED-PAYLOAD-TRAILER`, as aws-sdk-s3 sends file bodies over
/// http), signing `extra` too; for raw requests whose framing a test controls.
pub fn header_auth(
    addr: SocketAddr,
    method: &str,
    key: &str,
    content_sha: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    use spotrun_cache_proxy::sigv4::{self, CanonicalInput, Credential};
    let amz_date = aws_sdk_s3::primitives::DateTime::from(std::time::SystemTime::now())
        .fmt(aws_sdk_s3::primitives::DateTimeFormat::DateTime)
        .unwrap()
        .replace(['-', ':'], "");
    let amz_date = format!("{}Z", &amz_date[..15]);
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), addr.to_string()),
        ("x-amz-content-sha256".into(), content_sha.into()),
        ("x-amz-date".into(), amz_date.clone()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned())),
    );
    headers.sort();
    let cred = Credential::parse(&format!(
        "{AK}/{}/us-east-1/s3/aws4_request",
        &amz_date[..8]
    ))
    .unwrap();
    let path = format!("/{BUCKET}/{key}");
    let canonical = sigv4::canonical_request(&CanonicalInput {
        method,
        path: path.as_bytes(),
        query: &[],
        headers: headers.clone(),
        payload_hash: content_sha,
    });
    let signature = sigv4::sign(
        &sigv4::signing_key(SK, &cred),
        &sigv4::string_to_sign(
            "AWS4-HMAC-SHA256",
            &amz_date,
            &cred.scope(),
            &sigv4::sha256_hex(canonical.as_bytes()),
        ),
    );
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    headers.push((
        "authorization".into(),
        format!(
            "AWS4-HMAC-SHA256 Credential={AK}/{}, SignedHeaders={}, Signature={signature}",
            cred.scope(),
            signed.join(";")
        ),
    ));
    headers
}
