//! The proxy binary as a child process, for tests that kill it, restart it or measure its memory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{AK, BUCKET, RawResponse, SK, free_addr, parse_response};

const BIN: &str = env!("CARGO_BIN_EXE_spotrun-cache-proxy");

/// The proxy binary on a disk store under a test's directory, configured by a file it writes.
pub struct BinProxy {
    bin: PathBuf,
    child: Option<Child>,
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    config: PathBuf,
    pub store: PathBuf,
}

impl BinProxy {
    /// Loopback listeners, the test key, GC only on demand; `extra` is appended to the config file.
    pub fn new(dir: &Path, extra: &str) -> Self {
        let config = dir.join("proxy.toml");
        let (addr, ops_addr) = (free_addr(), free_addr());
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\nops_listen = \"{ops_addr}\"\nbuckets = [\"{BUCKET}\"]\n[[access_keys]]\nid = \"{AK}\"\nsecret = \"{SK}\"\n{extra}\n[gc]\ninterval_secs = 0\n"
            ),
        )
        .unwrap();
        Self {
            bin: PathBuf::from(BIN),
            child: None,
            addr,
            ops_addr,
            config,
            store: dir.join("store"),
        }
    }

    /// The same, running the static release binary the image ships (what memory bounds are
    /// about); fails saying how to build it.
    pub fn release(dir: &Path, extra: &str) -> Self {
        let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
            PathBuf::from,
        );
        let musl = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
        let bin = target_dir.join(&musl).join("dist/spotrun-cache-proxy");
        assert!(
            bin.is_file(),
            "{} is missing: build it with `cargo build --profile dist --locked --target {musl} -p \
             spotrun-cache-proxy` (./test.sh does this before the tests)",
            bin.display()
        );
        let mut proxy = Self::new(dir, extra);
        proxy.bin = bin;
        proxy
    }

    /// An SDK client for the test key (the SDK's default retries, as a runner's helper has).
    pub fn client(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(format!("http://{}", self.addr))
            .force_path_style(true)
            .credentials_provider(Credentials::new(AK, SK, None, None, "test"))
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// The running server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config")
            .arg(&self.config)
            .arg("--store")
            .arg(&self.store)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match spotrun_testkit::logcapture::create("cache-proxy-bin") {
            Some(f) => c.stderr(f),
            None => c.stderr(Stdio::null()),
        };
        c
    }

    pub async fn start(&mut self) {
        let mut cmd = self.command();
        cmd.arg("serve");
        self.child = Some(cmd.spawn().expect("start the proxy binary"));
        // A liveness bound by the clock, not a count of tries (each try takes longer under load);
        // a restart after SIGKILL may first recover its store.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(r)) = try_raw(self.ops_addr, "GET", "/healthz", &[]).await
                && r.status == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the proxy did not come up within 60 s");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Child::kill sends SIGKILL.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn gc(&self) -> serde_json::Value {
        self.maintenance("gc")
    }

    pub fn maintenance(&self, command: &str) -> serde_json::Value {
        let out = self
            .command()
            .arg(command)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "{command} failed");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for BinProxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One request on a fresh connection; `Ok(None)` when the server was not there or died mid-way.
pub async fn try_raw(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &[u8],
) -> std::io::Result<Option<RawResponse>> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let res = tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("a request to the proxy hung for 60 s");
    match res {
        Ok(buf) if buf.windows(4).any(|w| w == b"\r\n\r\n") => {
            let r = parse_response(&buf, method == "HEAD");
            // A response cut by the kill is not an answer.
            let complete = r
                .header("content-length")
                .and_then(|l| l.parse::<usize>().ok())
                .is_none_or(|l| method == "HEAD" || l == r.body.len());
            Ok(complete.then_some(r))
        }
        _ => Ok(None),
    }
}
