//! TCP fault proxy for tests: forwards loopback connections to an upstream and can cut, stall or delay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What to do to each proxied connection; changeable while running.
#[derive(Debug, Default)]
pub struct Faults {
    /// Close both directions after this many client→upstream bytes (0 = never).
    pub cut_after_upload_bytes: AtomicU64,
    /// Delay before each forwarded read, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Stop forwarding (but keep sockets open) once this many client→upstream bytes passed (0 = never).
    pub stall_after_upload_bytes: AtomicU64,
}

#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    pub faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let f = f.clone();
                tokio::spawn(async move {
                    if let Ok(up) = TcpStream::connect(upstream).await {
                        pipe(client, up, f).await;
                    }
                });
            }
        });
        Ok(Self { addr, faults, task })
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(client: TcpStream, up: TcpStream, f: Arc<Faults>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    let f2 = f.clone();
    // Returns true when the connection was cut on purpose.
    let upload = async move {
        let mut sent = 0u64;
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let delay = f.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let Ok(n) = cr.read(&mut buf).await else {
                return true;
            };
            if n == 0 {
                let _ = uw.shutdown().await;
                return false;
            }
            let cut = f.cut_after_upload_bytes.load(Ordering::Relaxed);
            let stall = f.stall_after_upload_bytes.load(Ordering::Relaxed);
            let mut n_fwd = n as u64;
            if cut > 0 && sent + n_fwd >= cut {
                n_fwd = cut - sent;
                let _ = uw
                    .write_all(&buf[..usize::try_from(n_fwd).unwrap_or(0)])
                    .await;
                return true; // dropping both halves closes the connections
            }
            if stall > 0 && sent + n_fwd >= stall {
                let _ = uw
                    .write_all(&buf[..usize::try_from(stall - sent).unwrap_or(0)])
                    .await;
                std::future::pending::<()>().await;
            }
            if uw.write_all(&buf[..n]).await.is_err() {
                return true;
            }
            sent += n_fwd;
        }
    };
    let download = async move {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let delay = f2.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            match ur.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = cw.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let download = tokio::spawn(download);
    // A cut ends both directions; a clean client EOF still lets the response through.
    if upload.await {
        download.abort();
    } else {
        let _ = download.await;
    }
}
