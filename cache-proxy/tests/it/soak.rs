//! Soak (issue 16): the static release binary the image ships, with default settings, under hostile clients in parallel —
//! trailer floods, 500 slow uploads, 1,000 header dribblers, a 200 k-entry zip, a gap-filled zip and
//! random bytes named `.zip` — while legitimate clients upload and download. Its peak RSS stays under
//! [`RSS_BOUND_MIB`], every legitimate request succeeds byte-identical, and after a SIGKILL the
//! restart serves every key and `gc` completes. `SPOTRUN_SOAK_SECS` (default 40) sets how long the
//! hostile phase lasts: long enough for the 30 s minimum-rate window to cut the slow uploads once.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::binproxy::BinProxy;
use crate::common::{BUCKET, RawResponse, header_auth, noise, parse_response, presign, sha256};

/// What the proxy may use at peak with default settings, whatever its clients do.
const RSS_BOUND_MIB: u64 = 256;

fn soak_duration() -> Duration {
    let secs = std::env::var("SPOTRUN_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    Duration::from_secs(secs)
}

/// A field of `/proc/<pid>/status` in KiB (`VmHWM` is the kernel's own peak-RSS record).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Waits until the peer closes (or `limit` passes) while writing one byte every `every`; true when
/// the peer closed.
async fn dribble_until_closed(mut s: TcpStream, every: Duration, until: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            },
            () = tokio::time::sleep(every) => {
                if Instant::now() >= until {
                    return false;
                }
                if s.write_all(b"x").await.is_err() {
                    return true;
                }
            }
        }
    }
}

/// Hostile clients' addresses: each a job pod of its own, as on a cluster (legitimate clients use
/// 127.0.0.1).
const FLOODER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const SLOW_UPLOADER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const DRIBBLER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(to).await
}

/// One request on a fresh connection (`Connection: close`); an error names what went wrong.
async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &[u8],
) -> Result<RawResponse, String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("sending the head: {e}"))?;
        s.write_all(body)
            .await
            .map_err(|e| format!("sending the body: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .map_err(|_| "no response within 60 s".to_owned())??;
    if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(format!("closed after {} bytes of response", buf.len()));
    }
    let r = parse_response(&buf, false);
    if r.status != 200 {
        return Err(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)));
    }
    Ok(r)
}

/// A presigned PUT of `body`, then a presigned GET that must return it.
async fn put_then_get(
    c: &aws_sdk_s3::Client,
    addr: SocketAddr,
    key: &str,
    body: &[u8],
) -> Result<(), String> {
    let (put, _) = presign(c, "PUT", key, None).await;
    request(addr, "PUT", &put, body)
        .await
        .map_err(|e| format!("PUT {key}: {e}"))?;
    let (get, _) = presign(c, "GET", key, None).await;
    let r = request(addr, "GET", &get, b"")
        .await
        .map_err(|e| format!("GET {key}: {e}"))?;
    if r.body != body {
        return Err(format!("GET {key}: {} bytes, not the body", r.body.len()));
    }
    Ok(())
}

/// A zip of `n` tiny stored entries, like a `node_modules` cache.
fn many_entry_zip(n: usize) -> Vec<u8> {
    use std::io::Write as _;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..n {
        w.start_file(format!("node_modules/p{}/f{i}.js", i / 50), opts)
            .unwrap();
        write!(w, "module.exports={i};").unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Empty local entries separated by megabytes of noise: all gaps, no real archive.
fn gap_filled_zip(entries: u8, gap: usize) -> Vec<u8> {
    let junk = noise(gap, 77);
    let mut body = Vec::new();
    for i in 0..entries {
        body.extend_from_slice(b"PK\x03\x04");
        body.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&[0; 12]);
        body.extend_from_slice(&[1, 0, 0, 0, b'a' + i]);
        body.extend_from_slice(&junk);
    }
    body
}

#[derive(Default)]
struct Tally {
    legit_ok: AtomicU64,
    trailer_cuts: AtomicU64,
    slow_cuts: AtomicU64,
    dribbler_cuts: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_in_parallel_leave_legit_clients_served_and_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinProxy::release(dir.path(), "");
    server.start().await;
    let (addr, pid) = (server.addr, server.pid());
    let c = server.client();
    let soak = soak_duration();
    let until = Instant::now() + soak;
    let tally = Arc::new(Tally::default());
    let mut hostile: Vec<JoinHandle<()>> = Vec::new();

    // Trailer floods: aws-chunked with endless trailer lines, reopened when cut.
    for i in 0..4 {
        let tally = tally.clone();
        hostile.push(tokio::spawn(async move {
            let key = format!("soak/trailers/{i}");
            let flood = b"a:b\r\n".repeat(10_000);
            while Instant::now() < until {
                let headers = header_auth(
                    addr,
                    "PUT",
                    &key,
                    "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                    &[
                        ("content-encoding", "aws-chunked"),
                        ("x-amz-decoded-content-length", "0"),
                    ],
                );
                let mut head = format!(
                    "PUT /{BUCKET}/{key} HTTP/1.1\r\nContent-Length: {}\r\n",
                    1u64 << 30
                );
                for (k, v) in &headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n0\r\n");
                let Ok(mut s) = connect_from(FLOODER, addr).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                if s.write_all(head.as_bytes()).await.is_ok() {
                    while Instant::now() < until && s.write_all(&flood).await.is_ok() {}
                }
                tally.trailer_cuts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    // 500 slow uploads on valid presigned URLs: a byte a second, far below the minimum rate.
    for i in 0..500 {
        let (put, _) = presign(&c, "PUT", &format!("soak/slow/{i}"), None).await;
        let tally = tally.clone();
        hostile.push(tokio::spawn(async move {
            while Instant::now() < until {
                let Ok(mut s) = connect_from(SLOW_UPLOADER, addr).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let head = format!(
                    "PUT {put} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1048576\r\n\r\n"
                );
                if s.write_all(head.as_bytes()).await.is_ok()
                    && dribble_until_closed(s, Duration::from_secs(1), until).await
                {
                    tally.slow_cuts.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }

    // 1,000 header dribblers without any credentials.
    for i in 0..1000u64 {
        let tally = tally.clone();
        hostile.push(tokio::spawn(async move {
            // Spread the arrivals over the first seconds, like a real flood ramping up.
            tokio::time::sleep(Duration::from_millis(i * 3)).await;
            while Instant::now() < until {
                let Ok(mut s) = connect_from(DRIBBLER, addr).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                if s.write_all(b"GET /runner-cache/x HTTP/1.1\r\nX-A: ")
                    .await
                    .is_ok()
                    && dribble_until_closed(s, Duration::from_secs(1), until).await
                {
                    tally.dribbler_cuts.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }

    // Hostile bodies on valid URLs: they must be stored and read back like any other.
    let odd_bodies: Vec<(&str, Vec<u8>)> = vec![
        ("soak/odd/node-modules.zip", many_entry_zip(200_000)),
        ("soak/odd/gaps.zip", gap_filled_zip(10, 8 << 20)),
        ("soak/odd/random.zip", noise(24 << 20, 78)),
    ];
    let odd_shas: Vec<(String, String)> = odd_bodies
        .iter()
        .map(|(k, b)| ((*k).to_owned(), sha256(b)))
        .collect();
    let mut legit: Vec<JoinHandle<Result<Vec<(String, String)>, String>>> = Vec::new();
    {
        let c = c.clone();
        legit.push(tokio::spawn(async move {
            for (key, body) in odd_bodies {
                put_then_get(&c, addr, key, &body).await?;
            }
            Ok(Vec::new())
        }));
    }

    // Legitimate runners: PUT then GET of cache archives, three keys each, until the soak ends.
    for client in 0..4u64 {
        let (c, tally) = (c.clone(), tally.clone());
        legit.push(tokio::spawn(async move {
            let mut last = std::collections::BTreeMap::new();
            let mut round = 0u64;
            while Instant::now() < until {
                round += 1;
                let key = format!("soak/legit/{client}/{}", round % 3);
                let size = 64 << 10 << (round % 7);
                let body = noise(size, client * 1000 + round);
                put_then_get(&c, addr, &key, &body).await?;
                last.insert(key, sha256(&body));
                tally.legit_ok.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(last.into_iter().collect())
        }));
    }

    // Watch the proxy's memory while the soak runs.
    let mut peak_rss_kib = 0;
    while Instant::now() < until {
        peak_rss_kib = peak_rss_kib.max(proc_status_kib(pid, "VmRSS"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut expected = odd_shas;
    for l in legit {
        let got = tokio::time::timeout(Duration::from_secs(60), l)
            .await
            .expect("legitimate clients finish within 60 s of the soak's end")
            .unwrap();
        expected.extend(got.unwrap_or_else(|e| panic!("a legitimate request failed: {e}")));
    }
    for h in &hostile {
        h.abort();
    }
    for h in hostile {
        let _ = h.await;
    }
    let hwm_kib = proc_status_kib(pid, "VmHWM").max(peak_rss_kib);
    let t = &*tally;
    println!(
        "soak {soak:?}: peak RSS {} MiB; {} legit PUT+GET pairs; cuts: {} trailer floods, {} slow uploads, {} header dribblers",
        hwm_kib >> 10,
        t.legit_ok.load(Ordering::Relaxed),
        t.trailer_cuts.load(Ordering::Relaxed),
        t.slow_cuts.load(Ordering::Relaxed),
        t.dribbler_cuts.load(Ordering::Relaxed),
    );
    assert!(
        hwm_kib <= RSS_BOUND_MIB << 10,
        "peak RSS {} MiB over the {RSS_BOUND_MIB} MiB bound",
        hwm_kib >> 10
    );
    assert!(
        t.legit_ok.load(Ordering::Relaxed) >= 4,
        "legitimate clients got through"
    );
    assert!(
        t.trailer_cuts.load(Ordering::Relaxed) > 0 && t.dribbler_cuts.load(Ordering::Relaxed) > 0,
        "the hostile clients were active and cut"
    );
    if soak >= Duration::from_secs(35) {
        assert!(
            t.slow_cuts.load(Ordering::Relaxed) > 0,
            "slow uploads are cut by the 30 s minimum-rate window"
        );
    }

    // A hard restart after the soak serves every key, and GC completes.
    server.kill();
    server.start().await;
    for (key, sha) in &expected {
        let (get, _) = presign(&c, "GET", key, None).await;
        let r = request(addr, "GET", &get, b"")
            .await
            .unwrap_or_else(|e| panic!("GET {key} after restart: {e}"));
        assert_eq!(&sha256(&r.body), sha, "{key} after restart");
    }
    let report = server.gc();
    println!("gc after the soak: {report}");
    assert!(report.get("packs_deleted").is_some(), "{report}");
    assert_eq!(
        server.maintenance("stats")["keys"].as_u64(),
        Some(expected.len() as u64),
        "no slow, cut or flooded upload left a key behind"
    );
    server.kill();
}
