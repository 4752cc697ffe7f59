//! S3 peer launcher: runs s3s-fs (found via `S3S_FS` or PATH) on a free loopback port; killed on Drop.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum S3PeerError {
    #[error(
        "s3s-fs not found: set S3S_FS or put it on PATH (cargo install s3s-fs@0.14.1 --features binary --locked)"
    )]
    NotFound,
    #[error("starting s3s-fs {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("s3s-fs exited early with {0}")]
    Exited(std::process::ExitStatus),
    #[error("s3s-fs did not accept connections on {0} within 10 s")]
    Timeout(SocketAddr),
    #[error("preparing the data dir: {0}")]
    Io(#[from] std::io::Error),
}

/// A running s3s-fs with its own data directory.
#[derive(Debug)]
pub struct S3Peer {
    child: Option<Child>,
    binary: PathBuf,
    data: tempfile::TempDir,
    pub addr: SocketAddr,
    pub access_key: String,
    pub secret_key: String,
}

/// Locate the s3s-fs binary.
pub fn s3s_fs_binary() -> Result<PathBuf, S3PeerError> {
    if let Some(p) = std::env::var_os("S3S_FS") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(S3PeerError::NotFound)
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
        .ok_or(S3PeerError::NotFound)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl S3Peer {
    /// Start with fresh credentials and the given buckets pre-created.
    pub fn start(buckets: &[&str]) -> Result<Self, S3PeerError> {
        let secret = format!("peer-secret-{:016x}", rand::random::<u64>());
        Self::start_with(buckets, "peer-access-key".into(), secret)
    }

    /// The s3s-fs process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Start without credentials: s3s-fs then serves unsigned requests (a stand-in behind a test
    /// front that does its own authentication, e.g. bearer tokens).
    pub fn start_anonymous(buckets: &[&str]) -> Result<Self, S3PeerError> {
        Self::start_with(buckets, String::new(), String::new())
    }

    /// Empty `access_key` = no authentication.
    fn start_with(
        buckets: &[&str],
        access_key: String,
        secret_key: String,
    ) -> Result<Self, S3PeerError> {
        let data = tempfile::tempdir()?;
        for b in buckets {
            std::fs::create_dir_all(data.path().join(b))?;
        }
        let mut peer = Self {
            child: None,
            binary: s3s_fs_binary()?,
            data,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            access_key,
            secret_key,
        };
        peer.spawn()?;
        Ok(peer)
    }

    fn spawn(&mut self) -> Result<(), S3PeerError> {
        let mut cmd = Command::new(&self.binary);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &self.addr.port().to_string(),
        ]);
        if !self.access_key.is_empty() {
            cmd.args([
                "--access-key",
                &self.access_key,
                "--secret-key",
                &self.secret_key,
            ]);
        }
        let child = cmd
            .arg(self.data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| S3PeerError::Spawn {
                path: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(S3PeerError::Exited(status));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(S3PeerError::Timeout(self.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    #[must_use]
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Stop the server (to simulate a backend outage); the data dir is kept.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port with the same data.
    pub fn restart(&mut self) -> Result<(), S3PeerError> {
        self.kill();
        self.spawn()
    }
}

impl Drop for S3Peer {
    fn drop(&mut self) {
        self.kill();
    }
}
