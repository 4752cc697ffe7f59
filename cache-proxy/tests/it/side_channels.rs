//! What the real binary tells someone who holds no key: the S3 port serves only S3 (the operations
//! endpoints are on `--ops-listen`), and its log shows no access key id a client sent (issue 16).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

use crate::common::{AK, SK, free_addr, presign, raw};

const BIN: &str = env!("CARGO_BIN_EXE_spotrun-cache-proxy");

/// The binary serving a disk store, its stderr (JSON log) in `dir/proxy.log`.
struct Binary {
    child: Child,
    addr: SocketAddr,
    ops_addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Binary {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (addr, ops_addr) = (free_addr(), free_addr());
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let child = Command::new(BIN)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--ops-listen")
            .arg(ops_addr.to_string())
            .arg("--store")
            .arg(dir.path().join("store"))
            .args(["--access-key", AK, "--secret-key", SK])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the proxy binary");
        let this = Self {
            child,
            addr,
            ops_addr,
            dir,
        };
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(ops_addr).await.is_ok()
                && raw(ops_addr, "GET", "/healthz", &[], b"").await.status == 200
            {
                return this;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the proxy did not come up within 10 s");
    }

    fn client_with(&self, ak: &str, sk: &str) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(format!("http://{}", self.addr))
            .force_path_style(true)
            .credentials_provider(Credentials::new(ak, sk, None, None, "test"))
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Stop the process and return its log.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Regression (issue 16): `/metrics` answered on the S3 port without a signature, and its chunk-hit
/// counters told anyone whether a guessed file was already cached; `/readyz` went there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints_are_not_on_the_s3_port() {
    let proxy = Binary::start().await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = raw(proxy.addr, "GET", path, &[], b"").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (403, "AccessDenied"),
            "{path} on the S3 port is an anonymous S3 request"
        );
        let r = raw(proxy.ops_addr, "GET", path, &[], b"").await;
        assert_eq!(r.status, 200, "{path} on the operations port");
    }
    // A signed request for bucket "metrics" is just an S3 request for a bucket we do not have.
    let err = proxy
        .client_with(AK, SK)
        .get_object()
        .bucket("metrics")
        .key("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.into_service_error().meta().code(), Some("NoSuchBucket"));
    let m = raw(proxy.ops_addr, "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("spotrun_cache_requests_total"), "{text}");
    // The operations port serves its three paths and nothing else.
    let r = raw(proxy.ops_addr, "GET", "/runner-cache/x", &[], b"").await;
    assert_eq!(r.status, 404);
    proxy.stop();
}

/// Regression (issue 16): a failed authentication logged the whole access key id the client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_logs_only_the_last_characters_of_the_key_id() {
    let proxy = Binary::start().await;
    let unknown = "AKIALEAKCHECK0000WXYZ";
    let (get, _) = presign(&proxy.client_with(unknown, SK), "GET", "k", None).await;
    let r = raw(proxy.addr, "GET", &get, &[], b"").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (403, "InvalidAccessKeyId")
    );
    // A credential of the wrong shape that starts with the id.
    let bad = get.replace("%2Faws4_request", "");
    let r = raw(proxy.addr, "GET", &bad, &[], b"").await;
    assert_eq!(r.status, 400);
    // The configured key, wrong secret: logged by its hint only, too.
    let (get, _) = presign(&proxy.client_with(AK, "wrong"), "GET", "k", None).await;
    assert_eq!(raw(proxy.addr, "GET", &get, &[], b"").await.status, 403);
    let log = proxy.stop();
    assert!(
        log.contains("authentication failed"),
        "the failures are logged: {log}"
    );
    assert!(log.contains("…WXYZ"), "the hint is logged: {log}");
    for secret in ["AKIALEAKCHECK", AK, SK] {
        assert!(
            !log.contains(secret),
            "{secret:?} appears in the log: {log}"
        );
    }
}
