//! The cache proxy binary as a child process (as deployed), with its peak RSS from `/proc`.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use spotrun_testkit::harness::CacheConfig;

pub const BUCKET: &str = "runner-cache";
const ACCESS_KEY: &str = "bench-runner-key";
const SECRET_KEY: &str = "bench-runner-secret-0123456789";

/// Where the proxy stores.
#[derive(Debug, Clone)]
pub enum ProxyStore {
    /// Its embedded local-disk store (in its own temp dir).
    Disk,
    /// An S3-compatible backend.
    S3 {
        endpoint: String,
        bucket: String,
        access_key: String,
        secret_key: String,
    },
}

#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz` (not on the S3 port).
    pub ops_addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl ProxyProcess {
    pub fn start(binary: &Path, store: &ProxyStore) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("spotrun-bench-proxy")
            .tempdir()?;
        let free = || -> anyhow::Result<SocketAddr> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
        };
        let (addr, ops_addr) = (free()?, free()?);
        let store_toml = match store {
            ProxyStore::Disk => format!(
                "kind = \"disk\"\npath = \"{}\"\n",
                dir.path().join("store").display()
            ),
            ProxyStore::S3 {
                endpoint,
                bucket,
                access_key,
                secret_key,
            } => format!(
                "kind = \"s3\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\nbucket = \"{bucket}\"\n\
                 path_style = true\naccess_key_id = \"{access_key}\"\nsecret_access_key = \"{secret_key}\"\n"
            ),
        };
        let config = format!(
            "listen = \"{addr}\"\nops_listen = \"{ops_addr}\"\nregion = \"us-east-1\"\nbuckets = [\"{BUCKET}\"]\nspool_dir = \"{spool}\"\n\
             [[access_keys]]\nid = \"{ACCESS_KEY}\"\nsecret = \"{SECRET_KEY}\"\n[store]\n{store_toml}\
             [gc]\ninterval_secs = 0\n",
            spool = dir.path().join("spool").display()
        );
        let config_path = dir.path().join("cache-proxy.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("proxy.log"))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut this = Self {
            child,
            addr,
            ops_addr,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(this);
            }
            if let Some(status) = this.child.try_wait()? {
                bail!("cache proxy exited with {status}: {}", this.log_tail());
            }
            if Instant::now() > deadline {
                bail!("cache proxy did not listen on {addr} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How clients presign for this proxy.
    #[must_use]
    pub fn signer(&self) -> CacheConfig {
        CacheConfig {
            server_address: self.addr.to_string(),
            bucket: BUCKET.into(),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            region: "us-east-1".into(),
            expires: Duration::from_secs(3600),
        }
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("reading /proc/PID/status of the proxy")?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmHWM line")?;
        Ok(kib * 1024)
    }

    /// The last lines of the proxy's log (for error messages).
    #[must_use]
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
