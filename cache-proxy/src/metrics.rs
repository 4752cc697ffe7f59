//! Prometheus text metrics: requests by op and status, bytes, chunk hits, latency, backend errors.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency bucket upper bounds in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    #[allow(clippy::type_complexity)] // (bucket counts, count, sum) per op
    latency: Mutex<BTreeMap<String, ([u64; BUCKETS.len()], u64, f64)>>,
    pub logical_bytes_in: AtomicU64,
    pub logical_bytes_out: AtomicU64,
    /// Bytes of new chunks written to packs.
    pub stored_bytes_in: AtomicU64,
    pub chunk_hits: AtomicU64,
    pub chunk_misses: AtomicU64,
    /// Bytes that were found already stored.
    pub dedup_bytes: AtomicU64,
    pub backend_errors: AtomicU64,
    pub corrupt_chunks: AtomicU64,
    /// Manifest segment streams opened (GET decodes one; HEAD must not).
    pub segment_streams: AtomicU64,
    /// Segment streams stored as a delta against an earlier similar one.
    pub segment_deltas: AtomicU64,
    /// Manifest writes retried after the backend throttled (hot keys).
    pub manifest_retries: AtomicU64,
}

impl Metrics {
    pub fn observe(&self, op: &str, status: u16, elapsed: Duration) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((op.to_owned(), status))
            .or_default() += 1;
        let secs = elapsed.as_secs_f64();
        let mut lat = self.latency.lock().expect("metrics lock");
        let entry = lat
            .entry(op.to_owned())
            .or_insert(([0; BUCKETS.len()], 0, 0.0));
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                entry.0[i] += 1;
            }
        }
        entry.1 += 1;
        entry.2 += secs;
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    #[must_use]
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP spotrun_cache_requests_total S3 requests by operation and HTTP status."
        );
        let _ = writeln!(s, "# TYPE spotrun_cache_requests_total counter");
        for ((op, status), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                s,
                "spotrun_cache_requests_total{{op=\"{op}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP spotrun_cache_request_duration_seconds Request latency by operation."
        );
        let _ = writeln!(s, "# TYPE spotrun_cache_request_duration_seconds histogram");
        for (op, (buckets, count, sum)) in self.latency.lock().expect("metrics lock").iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "spotrun_cache_request_duration_seconds_bucket{{op=\"{op}\",le=\"{b}\"}} {}",
                    buckets[i]
                );
            }
            let _ = writeln!(
                s,
                "spotrun_cache_request_duration_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                s,
                "spotrun_cache_request_duration_seconds_sum{{op=\"{op}\"}} {sum}"
            );
            let _ = writeln!(
                s,
                "spotrun_cache_request_duration_seconds_count{{op=\"{op}\"}} {count}"
            );
        }
        let counters = [
            (
                "spotrun_cache_logical_bytes_in_total",
                "Object bytes received in PUTs.",
                &self.logical_bytes_in,
            ),
            (
                "spotrun_cache_logical_bytes_out_total",
                "Object bytes sent in GETs.",
                &self.logical_bytes_out,
            ),
            (
                "spotrun_cache_stored_bytes_in_total",
                "New chunk bytes written to the backend.",
                &self.stored_bytes_in,
            ),
            (
                "spotrun_cache_chunk_hits_total",
                "Chunks found already stored.",
                &self.chunk_hits,
            ),
            (
                "spotrun_cache_chunk_misses_total",
                "Chunks that had to be stored.",
                &self.chunk_misses,
            ),
            (
                "spotrun_cache_dedup_bytes_total",
                "Bytes not stored because they were already present.",
                &self.dedup_bytes,
            ),
            (
                "spotrun_cache_backend_errors_total",
                "Failed backend operations.",
                &self.backend_errors,
            ),
            (
                "spotrun_cache_corrupt_chunks_total",
                "Chunks whose digest did not match on read.",
                &self.corrupt_chunks,
            ),
            (
                "spotrun_cache_segment_streams_total",
                "Manifest segment streams decoded (one per GET).",
                &self.segment_streams,
            ),
            (
                "spotrun_cache_segment_deltas_total",
                "Segment streams stored as a delta against an earlier similar stream.",
                &self.segment_deltas,
            ),
            (
                "spotrun_cache_manifest_retries_total",
                "Manifest writes retried because the backend throttled them.",
                &self.manifest_retries,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let logical = self.logical_bytes_in.load(Ordering::Relaxed);
        let stored = self.stored_bytes_in.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)] // a ratio for humans
        let ratio = if stored == 0 {
            0.0
        } else {
            logical as f64 / stored as f64
        };
        let _ = writeln!(
            s,
            "# HELP spotrun_cache_dedup_ratio Logical bytes received per stored byte since start.\n# TYPE spotrun_cache_dedup_ratio gauge\nspotrun_cache_dedup_ratio {ratio}"
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.observe("GetObject", 200, Duration::from_millis(20));
        Metrics::add(&m.logical_bytes_in, 10);
        Metrics::add(&m.stored_bytes_in, 5);
        let text = m.render();
        assert!(text.contains("spotrun_cache_requests_total{op=\"GetObject\",status=\"200\"} 1\n"));
        assert!(text.contains(
            "spotrun_cache_request_duration_seconds_bucket{op=\"GetObject\",le=\"0.025\"} 1\n"
        ));
        assert!(text.contains(
            "spotrun_cache_request_duration_seconds_bucket{op=\"GetObject\",le=\"0.01\"} 0\n"
        ));
        assert!(text.contains("spotrun_cache_dedup_ratio 2\n"));
    }
}
