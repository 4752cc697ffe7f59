//! The cache proxy binary as a child process (as deployed), with its peak RSS from `/proc`; it can be
//! restarted on the same store, and probed for readiness.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use spotrun_testkit::harness::CacheConfig;

use crate::http::{Http, full};

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
    binary: std::path::PathBuf,
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
        std::fs::write(dir.path().join("cache-proxy.toml"), config)?;
        let child = spawn(binary, dir.path())?;
        let mut this = Self {
            child,
            binary: binary.to_path_buf(),
            addr,
            ops_addr,
            dir,
        };
        this.wait_listening()?;
        Ok(this)
    }

    /// Stop the process and start a new one on the same config and store; returns the moment the
    /// new one was spawned, without waiting for it (see `wait_ready`).
    pub fn restart(&mut self) -> anyhow::Result<Instant> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let spawned = Instant::now();
        self.child = spawn(&self.binary, self.dir.path())?;
        Ok(spawned)
    }

    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("cache proxy exited with {status}: {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("cache proxy did not listen on {} within 20 s", self.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// URL of an operations endpoint (`/metrics`, `/readyz`): the one place to change if they move
    /// to their own port (`--ops-listen`).
    #[must_use]
    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ops_addr)
    }

    /// Poll the readiness probe every 2 ms until it answers 200 (`http` should hold no pooled
    /// connection to an earlier process).
    pub async fn wait_ready(&mut self, http: &Http, within: Duration) -> anyhow::Result<()> {
        let url = self.ops_url("/readyz");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(done) = http.send("GET", &url, &[], full(Bytes::new()), 0).await
                && done.status == 200
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("cache proxy exited with {status}: {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("cache proxy was not ready at {url} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
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

/// Start the binary on `dir/cache-proxy.toml`, logging to `dir/proxy.log` (appended across restarts).
fn spawn(binary: &Path, dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("proxy.log"))?;
    Command::new(binary)
        .arg("--config")
        .arg(dir.join("cache-proxy.toml"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
