//! TCP fault proxy for tests: forwards loopback connections to an upstream and can delay, throttle,
//! cut (FIN or RST), stall or refuse them. Faults are atomics, changeable while connections run; each
//! byte threshold and the bandwidth limit count per connection and per direction. `latency_ms` and
//! `bytes_per_sec` together shape a link like a remote object store's (the benchmark's remote mode).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What to do to each proxied connection; changeable while running. Zero means "off" everywhere.
#[derive(Debug, Default)]
pub struct Faults {
    /// Close both directions after this many client→upstream bytes.
    pub cut_after_upload_bytes: AtomicU64,
    /// Close both directions after this many upstream→client bytes.
    pub cut_after_download_bytes: AtomicU64,
    /// Cuts send a TCP reset (`SO_LINGER` 0) instead of a clean FIN.
    pub reset: AtomicBool,
    /// Delay before each forwarded read, in milliseconds. Serial: a bulk transfer pays it once per
    /// read of at most 16 KiB (it slows throughput too); for a link's latency use `latency_ms`.
    pub delay_ms: AtomicU64,
    /// Bandwidth limit per connection and direction, in bytes per second.
    pub bytes_per_sec: AtomicU64,
    /// One-way latency in milliseconds: every forwarded read reaches the other side this much later,
    /// pipelined like a real link (reads keep flowing meanwhile, so throughput is unaffected).
    /// Taken when a connection opens.
    pub latency_ms: AtomicU64,
    /// Stop forwarding (but keep sockets open) once this many client→upstream bytes passed.
    pub stall_after_upload_bytes: AtomicU64,
    /// Stop forwarding (but keep sockets open) once this many upstream→client bytes passed.
    pub stall_after_download_bytes: AtomicU64,
    /// Refuse new connections (accept, then reset at once): the backend looks down.
    pub refuse: AtomicBool,
}

impl Faults {
    /// Turn every fault off (the backend "returns"); running stalled connections stay stalled.
    pub fn clear(&self) {
        for a in [
            &self.cut_after_upload_bytes,
            &self.cut_after_download_bytes,
            &self.delay_ms,
            &self.bytes_per_sec,
            &self.latency_ms,
            &self.stall_after_upload_bytes,
            &self.stall_after_download_bytes,
        ] {
            a.store(0, Ordering::SeqCst);
        }
        self.reset.store(false, Ordering::SeqCst);
        self.refuse.store(false, Ordering::SeqCst);
    }
}

/// Counters for assertions that a fault really happened.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub cuts: AtomicU64,
    pub stalls: AtomicU64,
    pub refused: AtomicU64,
}

#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    pub faults: Arc<Faults>,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        let counters = Arc::new(Counters::default());
        let (f, c) = (faults.clone(), counters.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (f, c) = (f.clone(), c.clone());
                c.connections.fetch_add(1, Ordering::Relaxed);
                if f.refuse.load(Ordering::SeqCst) {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = client.set_zero_linger();
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    match TcpStream::connect(upstream).await {
                        Ok(up) => pipe(client, up, f, c).await,
                        Err(_) => {
                            let _ = client.set_zero_linger();
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            faults,
            counters,
            task,
        })
    }

    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Upload,
    Download,
}

/// How one direction ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The source closed cleanly; the other direction may continue.
    Eof,
    /// Cut on purpose or broken: close everything.
    Cut,
}

/// Forward one direction until EOF, a cut, or `stop` (the other direction was cut). A cut with
/// `reset` set closes both sockets with RST: linger 0, and the write half is forgotten rather than
/// shut down, since a shutdown would send a FIN first.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    dir: Dir,
    f: &Faults,
    c: &Counters,
    stop: &tokio::sync::Notify,
) -> End {
    let latency = Duration::from_millis(f.latency_ms.load(Ordering::SeqCst));
    let run = async {
        if latency.is_zero() {
            return pump(&mut from, Out::Socket(&mut to), dir, f, c).await;
        }
        let (queue, delivered) = mpsc::channel(LATENCY_QUEUE_READS);
        let reader = pump(&mut from, Out::Delayed { queue, latency }, dir, f, c);
        let writer = deliver(delivered, &mut to);
        tokio::pin!(reader, writer);
        tokio::select! {
            biased;
            end = &mut reader => match end {
                // What was read is still on its way: let it arrive, then pass the FIN on.
                End::Eof => writer.await,
                End::Cut => End::Cut,
            },
            // Only a failed write ends delivery before the reader.
            end = &mut writer => end,
        }
    };
    let end = tokio::select! {
        e = run => e,
        () = stop.notified() => End::Cut,
    };
    if end == End::Cut && f.reset.load(Ordering::SeqCst) {
        let _ = from.as_ref().set_zero_linger();
        let _ = to.as_ref().set_zero_linger();
        to.forget();
    }
    end
}

/// Reads in flight per direction of a connection with latency (each at most 16 KiB): 1024 cover a
/// 40 MiB/s link's bandwidth-delay product up to ~400 ms, and bound the memory a stalled reader costs.
const LATENCY_QUEUE_READS: usize = 1024;

/// How far a rate-limited direction may fall behind its schedule and catch up: the timer rounds
/// sleeps up to whole milliseconds, so without it a fast link (40 MiB/s is a 16 KiB read every
/// 0.4 ms) runs at a fraction of its limit. Also the largest burst after an idle spell.
const PACING_SLACK: Duration = Duration::from_millis(10);

/// Where one direction's bytes go: straight to the socket, or onto a queue that delivers each read
/// `latency` after it was read.
enum Out<'a> {
    Socket(&'a mut OwnedWriteHalf),
    Delayed {
        queue: mpsc::Sender<(Instant, Bytes)>,
        latency: Duration,
    },
}

impl Out<'_> {
    /// False when the bytes cannot go on (the socket or the delivery failed).
    async fn send(&mut self, data: &[u8]) -> bool {
        match self {
            Out::Socket(to) => to.write_all(data).await.is_ok(),
            Out::Delayed { queue, latency } => queue
                .send((Instant::now() + *latency, Bytes::copy_from_slice(data)))
                .await
                .is_ok(),
        }
    }

    /// The source ended cleanly: pass the FIN on (for a delayed direction, once the queue drains).
    async fn finish(self) {
        if let Out::Socket(to) = self {
            let _ = to.shutdown().await;
        }
    }
}

/// Write each queued read when it is due; shut the socket down when the queue ends.
async fn deliver(mut queue: mpsc::Receiver<(Instant, Bytes)>, to: &mut OwnedWriteHalf) -> End {
    while let Some((due, data)) = queue.recv().await {
        tokio::time::sleep_until(due).await;
        if to.write_all(&data).await.is_err() {
            return End::Cut;
        }
    }
    let _ = to.shutdown().await;
    End::Eof
}

async fn pump(
    from: &mut OwnedReadHalf,
    mut to: Out<'_>,
    dir: Dir,
    f: &Faults,
    c: &Counters,
) -> End {
    let (cut_at, stall_at) = match dir {
        Dir::Upload => (&f.cut_after_upload_bytes, &f.stall_after_upload_bytes),
        Dir::Download => (&f.cut_after_download_bytes, &f.stall_after_download_bytes),
    };
    let mut passed = 0u64;
    let mut buf = vec![0u8; 16 << 10];
    // The bandwidth limit's schedule: when the next read may start.
    let mut next_read = Instant::now();
    loop {
        let delay = f.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        // Read at most one bandwidth tick's worth (1/10 s) so the limit is smooth.
        let bps = f.bytes_per_sec.load(Ordering::Relaxed);
        let want = if bps > 0 {
            usize::try_from((bps / 10).clamp(1, buf.len() as u64)).unwrap_or(1)
        } else {
            buf.len()
        };
        let n = match from.read(&mut buf[..want]).await {
            Ok(0) => {
                to.finish().await;
                return End::Eof;
            }
            Ok(n) => n as u64,
            Err(_) => return End::Cut,
        };
        let cut = cut_at.load(Ordering::Relaxed);
        let stall = stall_at.load(Ordering::Relaxed);
        // Thresholds may be set below what a (pooled) connection already passed: act at once then.
        let mut fwd = n;
        if cut > 0 && passed + n >= cut {
            fwd = cut.saturating_sub(passed);
        }
        if stall > 0 && passed + n >= stall {
            fwd = fwd.min(stall.saturating_sub(passed));
        }
        let slice = &buf[..usize::try_from(fwd).expect("fits the buffer")];
        if !to.send(slice).await {
            return End::Cut;
        }
        passed += fwd;
        if cut > 0 && passed >= cut {
            c.cuts.fetch_add(1, Ordering::Relaxed);
            return End::Cut;
        }
        if stall > 0 && passed >= stall {
            c.stalls.fetch_add(1, Ordering::Relaxed);
            std::future::pending::<()>().await;
        }
        if let Some(ns) = fwd.saturating_mul(1_000_000_000).checked_div(bps) {
            // Each forwarded byte moves the schedule by 1/bps; sleeping until the schedule (not for
            // n/bps after each write) keeps the average exact despite the timer's rounding.
            let now = Instant::now();
            let floor = now.checked_sub(PACING_SLACK).unwrap_or(now);
            next_read = next_read.max(floor) + Duration::from_nanos(ns);
            tokio::time::sleep_until(next_read).await;
        }
    }
}

async fn pipe(client: TcpStream, up: TcpStream, f: Arc<Faults>, c: Arc<Counters>) {
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = up.into_split();
    let stop_up = Arc::new(tokio::sync::Notify::new());
    let stop_down = Arc::new(tokio::sync::Notify::new());
    let (f2, c2, s2) = (f.clone(), c.clone(), stop_up.clone());
    let mut upload = tokio::spawn(async move { forward(cr, uw, Dir::Upload, &f2, &c2, &s2).await });
    let s3 = stop_down.clone();
    let mut download =
        tokio::spawn(async move { forward(ur, cw, Dir::Download, &f, &c, &s3).await });
    // A cut in either direction ends both; a clean EOF lets the other direction finish.
    let (first, other, stop_other) = tokio::select! {
        r = &mut upload => (r, download, stop_down),
        r = &mut download => (r, upload, stop_up),
    };
    if !matches!(first, Ok(End::Eof)) {
        stop_other.notify_one();
    }
    let _ = other.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that answers each connection with `reply` after reading `expect` bytes (echo-less).
    async fn upstream(reply: Vec<u8>, expect: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    let mut got = vec![0u8; expect];
                    if s.read_exact(&mut got).await.is_ok() {
                        let _ = s.write_all(&reply).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    /// Send `out`, then read until EOF or error: (bytes read, whether it ended in an error).
    async fn exchange(addr: SocketAddr, out: &[u8]) -> (Vec<u8>, bool) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(out).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return false,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(_) => return true,
                }
            }
        })
        .await
        .expect("the exchange ends within 10 s");
        (got, r)
    }

    #[tokio::test]
    async fn forwards_cleanly_without_faults() {
        let reply: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let p = FaultProxy::start(upstream(reply.clone(), 5).await)
            .await
            .unwrap();
        let (got, err) = exchange(p.addr, b"hello").await;
        assert_eq!((got, err), (reply, false));
    }

    #[tokio::test]
    async fn download_cut_truncates_and_reset_is_an_error() {
        let reply = vec![7u8; 100_000];
        let p = FaultProxy::start(upstream(reply, 1).await).await.unwrap();
        p.faults
            .cut_after_download_bytes
            .store(30_000, Ordering::SeqCst);
        let (got, err) = exchange(p.addr, b"x").await;
        assert_eq!(
            (got.len(), err),
            (30_000, false),
            "a FIN cut looks like EOF"
        );
        p.faults.reset.store(true, Ordering::SeqCst);
        let (got, err) = exchange(p.addr, b"x").await;
        assert!(got.len() <= 30_000);
        assert!(err, "a reset cut is a read error");
        assert_eq!(p.counters.cuts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn upload_cut_means_the_upstream_never_answers() {
        let p = FaultProxy::start(upstream(b"ok".to_vec(), 1000).await)
            .await
            .unwrap();
        p.faults.cut_after_upload_bytes.store(500, Ordering::SeqCst);
        let (got, _) = exchange(p.addr, &[1u8; 1000]).await;
        assert!(got.is_empty());
        p.faults.clear();
        let (got, err) = exchange(p.addr, &[1u8; 1000]).await;
        assert_eq!(
            (got.as_slice(), err),
            (&b"ok"[..], false),
            "service resumes"
        );
    }

    #[tokio::test]
    async fn stall_holds_the_connection_open() {
        let p = FaultProxy::start(upstream(vec![1u8; 10_000], 1).await)
            .await
            .unwrap();
        p.faults
            .stall_after_download_bytes
            .store(1_000, Ordering::SeqCst);
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut got = vec![0u8; 1_000];
        s.read_exact(&mut got).await.unwrap();
        let mut more = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(300), s.read(&mut more)).await;
        assert!(r.is_err(), "no byte and no EOF while stalled");
        assert_eq!(p.counters.stalls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refuse_resets_new_connections() {
        let p = FaultProxy::start(upstream(b"ok".to_vec(), 1).await)
            .await
            .unwrap();
        p.faults.refuse.store(true, Ordering::SeqCst);
        let (got, _) = exchange(p.addr, b"x").await;
        assert!(got.is_empty());
        assert_eq!(p.counters.refused.load(Ordering::SeqCst), 1);
        p.faults.clear();
        assert_eq!(exchange(p.addr, b"x").await.0, b"ok");
    }

    #[tokio::test]
    async fn bandwidth_limit_and_delay_still_deliver_everything() {
        let reply = vec![3u8; 50_000];
        let p = FaultProxy::start(upstream(reply.clone(), 1).await)
            .await
            .unwrap();
        p.faults.bytes_per_sec.store(200_000, Ordering::SeqCst);
        p.faults.delay_ms.store(5, Ordering::SeqCst);
        let (got, err) = exchange(p.addr, b"x").await;
        assert_eq!((got, err), (reply, false));
    }

    /// An upstream that, on each connection, reads `expect` bytes while it writes `send` bytes, then
    /// closes: both directions busy at once.
    async fn duplex_upstream(expect: usize, send: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let read = async move {
                        let mut got = vec![0u8; expect];
                        r.read_exact(&mut got).await.is_ok()
                    };
                    let write = async move {
                        let _ = w.write_all(&vec![9u8; send]).await;
                        w
                    };
                    let (_, mut w) = tokio::join!(read, write);
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    /// One client of `duplex_upstream`: writes `out` bytes while reading to EOF; returns bytes read.
    async fn duplex_client(addr: SocketAddr, out: usize) -> usize {
        let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
        let write = async move {
            w.write_all(&vec![1u8; out]).await.unwrap();
            w
        };
        let read = async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got.len()
        };
        tokio::join!(write, read).1
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bandwidth_limit_is_per_connection_and_per_direction() {
        let n = 1 << 20;
        let p = FaultProxy::start(duplex_upstream(n, n).await)
            .await
            .unwrap();
        p.faults.bytes_per_sec.store(4 << 20, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let (a, b) = tokio::join!(duplex_client(p.addr, n), duplex_client(p.addr, n));
        let took = started.elapsed();
        assert_eq!((a, b), (n, n));
        // 1 MiB each way on each connection at 4 MiB/s: 0.25 s. A limit shared by the two
        // directions or the two connections would need 0.5 s, by all four 1 s.
        assert!(
            took >= Duration::from_millis(230) && took < Duration::from_millis(450),
            "took {took:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bandwidth_limit_holds_at_a_fast_link_rate() {
        let n = 8 << 20;
        let p = FaultProxy::start(upstream(vec![5u8; n], 1).await)
            .await
            .unwrap();
        p.faults.bytes_per_sec.store(40 << 20, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let (got, err) = exchange(p.addr, b"x").await;
        let took = started.elapsed();
        assert_eq!((got.len(), err), (n, false));
        // 8 MiB at 40 MiB/s is 0.2 s (less the 10 ms pacing slack). Sleeping 16 KiB / 40 MiB/s =
        // 0.4 ms after each read, as this proxy did, rounds up to 1 ms: ≤ 16 MiB/s, ≥ 0.5 s.
        assert!(
            took >= Duration::from_millis(185) && took < Duration::from_millis(420),
            "took {took:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_is_one_way_per_read_and_pipelined() {
        let p = FaultProxy::start(upstream(vec![4u8; 4 << 20], 1).await)
            .await
            .unwrap();
        p.faults.latency_ms.store(50, Ordering::SeqCst);
        // First byte back: the request's byte travels 50 ms up, the reply's first read 50 ms down.
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let started = std::time::Instant::now();
        s.write_all(b"x").await.unwrap();
        let mut first = [0u8; 1];
        s.read_exact(&mut first).await.unwrap();
        let first_byte = started.elapsed();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        let all = started.elapsed();
        assert_eq!(rest.len() + 1, 4 << 20);
        assert!(
            first_byte >= Duration::from_millis(100) && first_byte < Duration::from_millis(300),
            "first byte after {first_byte:?}"
        );
        // 4 MiB is ≥ 256 reads: paid serially (as `delay_ms` does) that would be ≥ 12.8 s.
        assert!(all < Duration::from_secs(2), "4 MiB took {all:?}");
    }
}
