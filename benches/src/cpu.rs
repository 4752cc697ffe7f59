//! P4: chunk + hash throughput (`FastCDC` with the proxy's data parameters, SHA-256 per chunk, as the
//! ingest loop does) against plain SHA-256 over the same bytes, both on one core.

use std::io::Cursor;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use spotrun_cache_proxy::dedup::DATA_CDC;

use crate::data::unique_bytes;
use crate::mib_per_s;
use crate::report::{Goal, Row};

fn best_of(runs: u32, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Runs on the calling thread (one core).
#[must_use]
pub fn run(size: usize) -> Row {
    let data = unique_bytes(size, 4);
    let sha = best_of(3, || {
        let mut h = Sha256::new();
        for piece in data.chunks(1 << 20) {
            h.update(piece);
        }
        std::hint::black_box(h.finalize());
    });
    let (min, avg, max) = DATA_CDC;
    let mut chunks = 0usize;
    let cdc = best_of(3, || {
        chunks = 0;
        for chunk in fastcdc::v2020::StreamCDC::new(Cursor::new(&data[..]), min, avg, max) {
            let chunk = chunk.expect("reading memory cannot fail");
            std::hint::black_box(Sha256::digest(&chunk.data));
            chunks += 1;
        }
    });
    let bytes = data.len() as u64;
    Row {
        id: "P4",
        measure: format!(
            "chunk + hash vs SHA-256 alone, one core ({} MiB)",
            size >> 20
        ),
        value: sha.as_secs_f64() / cdc.as_secs_f64(),
        unit: "×",
        goal: Goal::AtLeast(0.8),
        detail: format!(
            "FastCDC + SHA-256 {:.0} MiB/s ({chunks} chunks), SHA-256 {:.0} MiB/s",
            mib_per_s(bytes, cdc),
            mib_per_s(bytes, sha)
        ),
    }
}
