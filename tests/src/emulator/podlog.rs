//! Container logs as the kubelet serves them (`GET pods/{name}/log`): the bytes a container wrote
//! (stdout and stderr share one file), stamped with when they were first seen, so `sinceTime`,
//! `sinceSeconds` and `timestamps` work alongside `tailLines` and `follow`.
//!
//! The stamps are an approximation of the kubelet's (which stamps each line as the runtime reads
//! it): the file's size is sampled every [`SAMPLE_EVERY`] while the container runs, at every read
//! and once more when it stops, and a line is stamped with the first sample that saw its first
//! byte, so up to 50 ms after the write. Only stamped bytes are served, so a line carries the same
//! stamp in every response and `sinceTime` agrees with `timestamps`. A restarted container appends
//! to the same file (the kubelet would serve only the current instance).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use k8s_openapi::jiff::Timestamp;

use super::kubelet::PodHandle;
use super::status::ApiError;

/// How often a running container's log size is sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// The samples of one container's log.
#[derive(Debug, Default)]
pub(crate) struct LogMarks {
    /// (when, size): the file had `size` bytes at `when`; sizes strictly increase.
    marks: Vec<(SystemTime, u64)>,
    /// The container's current run (a restart starts a new one).
    run: u64,
    /// The container stopped and its last bytes are stamped: followers end once they sent them.
    settled: bool,
}

impl LogMarks {
    fn record(&mut self, at: SystemTime, size: u64) {
        if size > self.len() {
            self.marks.push((at, size));
        }
    }

    /// The stamped length: what may be served.
    pub(crate) fn len(&self) -> u64 {
        self.marks.last().map_or(0, |m| m.1)
    }

    /// When byte `offset` was first seen (`None` past the stamped length).
    pub(crate) fn stamp_of(&self, offset: u64) -> Option<SystemTime> {
        let i = self.marks.partition_point(|m| m.1 <= offset);
        self.marks.get(i).map(|m| m.0)
    }
}

/// Every container's samples, per pod.
pub(crate) type PodLogs = Mutex<HashMap<String, LogMarks>>;

fn lock(h: &PodHandle) -> std::sync::MutexGuard<'_, HashMap<String, LogMarks>> {
    h.log_marks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn size_of(h: &PodHandle, container: &str) -> u64 {
    std::fs::metadata(h.log_path(container)).map_or(0, |m| m.len())
}

/// A container (re)starts: a new run of samples; returns its number for the sampler.
pub(crate) fn run_started(h: &PodHandle, container: &str) -> u64 {
    let mut all = lock(h);
    let m = all.entry(container.to_string()).or_default();
    m.run += 1;
    m.settled = false;
    m.run
}

/// Takes a sample for `run`; false when that run is over (restarted, or stopped and settled).
fn sample(h: &PodHandle, container: &str, run: Option<u64>) -> bool {
    let size = size_of(h, container);
    let mut all = lock(h);
    let m = all.entry(container.to_string()).or_default();
    if m.settled || run.is_some_and(|r| r != m.run) {
        return false;
    }
    m.record(SystemTime::now(), size);
    true
}

/// The container stopped: its last sample; followers end once they have sent everything.
pub(crate) fn settle(h: &PodHandle, container: &str) {
    let size = size_of(h, container);
    let mut all = lock(h);
    let m = all.entry(container.to_string()).or_default();
    m.record(SystemTime::now(), size);
    m.settled = true;
}

/// Samples run `run` of the container until it is over or the emulator stops.
pub(crate) async fn sample_while_running(
    h: std::sync::Arc<PodHandle>,
    container: String,
    run: u64,
    stopping: tokio_util::sync::CancellationToken,
) {
    while sample(&h, &container, Some(run)) {
        tokio::select! {
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
            () = stopping.cancelled() => return,
        }
    }
}

/// Samples now (a reader wants what is there) and returns (stamped length, settled).
pub(crate) fn extent(h: &PodHandle, container: &str) -> (u64, bool) {
    sample(h, container, None);
    let all = lock(h);
    all.get(container)
        .map_or((0, false), |m| (m.len(), m.settled))
}

/// Runs `f` on the container's samples.
pub(crate) fn with_marks<R>(h: &PodHandle, container: &str, f: impl FnOnce(&LogMarks) -> R) -> R {
    let all = lock(h);
    match all.get(container) {
        Some(m) => f(m),
        None => f(&LogMarks::default()),
    }
}

/// The query of a log request. Parameters the emulator does not implement are refused by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LogQuery {
    pub container: Option<String>,
    pub follow: bool,
    pub timestamps: bool,
    pub tail_lines: Option<usize>,
    /// From `sinceTime`, or `sinceSeconds` before `now`.
    pub since: Option<SystemTime>,
}

fn invalid(param: &str, value: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("{param}: Invalid value: {value:?}: {why}"))
}

fn boolean(param: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        _ => Err(invalid(param, v, "must be a boolean")),
    }
}

pub(crate) fn parse_query(q: &[(String, String)], now: SystemTime) -> Result<LogQuery, ApiError> {
    let mut out = LogQuery::default();
    let mut since_seconds = None;
    let mut since_time = None;
    for (k, v) in q {
        match k.as_str() {
            "container" => out.container = Some(v.clone()),
            "follow" => out.follow = boolean(k, v)?,
            "timestamps" => out.timestamps = boolean(k, v)?,
            "tailLines" => {
                let n: i64 = v.parse().map_err(|_| invalid(k, v, "must be an integer"))?;
                let n = usize::try_from(n)
                    .map_err(|_| invalid(k, v, "must be greater than or equal to 0"))?;
                out.tail_lines = Some(n);
            }
            "sinceSeconds" => {
                let n: u64 = v.parse().map_err(|_| invalid(k, v, "must be an integer"))?;
                if n == 0 {
                    return Err(invalid(k, v, "must be greater than 0"));
                }
                since_seconds = Some(n);
            }
            "sinceTime" => {
                let t: Timestamp = v
                    .parse()
                    .map_err(|_| invalid(k, v, "must be an RFC 3339 time"))?;
                since_time = Some(SystemTime::from(t));
            }
            // `previous`, `limitBytes`, `insecureSkipTLSVerifyBackend`, ...: a real apiserver
            // takes them; a test relying on one must not get a silently different answer.
            other => {
                return Err(ApiError::bad_request(format!(
                    "the emulator does not implement the pod log parameter {other:?}"
                )));
            }
        }
    }
    if since_time.is_some() && since_seconds.is_some() {
        return Err(ApiError::bad_request(
            "at most one of sinceTime or sinceSeconds may be specified",
        ));
    }
    out.since = since_time
        .or_else(|| since_seconds.map(|s| now.checked_sub(Duration::from_secs(s)).unwrap_or(now)));
    Ok(out)
}

/// RFC 3339 with nanoseconds, trailing zeros cut, as Go's `RFC3339Nano` (the kubelet's stamps).
pub(crate) fn format_stamp(t: SystemTime) -> String {
    Timestamp::try_from(t).map_or_else(|_| "1970-01-01T00:00:00Z".into(), |t| t.to_string())
}

/// One response's line-by-line state: lines stamped before `since` are left out; with
/// `timestamps` each line starts with its stamp and a space.
#[derive(Debug)]
pub(crate) struct Renderer {
    since: Option<SystemTime>,
    timestamps: bool,
    at_line_start: bool,
    skipping: bool,
}

impl Renderer {
    /// The renderer for a response whose first bytes are `data` (the stamped log from offset 0):
    /// returns it with the offset to render from, after `sinceTime` and `tailLines`.
    pub(crate) fn start(q: &LogQuery, data: &[u8], marks: &LogMarks) -> (Self, usize) {
        let since = q.since;
        let mut starts = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let stamp = marks.stamp_of(pos as u64);
            let before_since = since.is_some_and(|s| stamp.is_some_and(|t| t < s));
            if !before_since {
                starts.push(pos);
            }
            pos = data[pos..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(data.len(), |i| pos + i + 1);
        }
        let from = match q.tail_lines {
            Some(0) => data.len(),
            Some(n) if starts.len() > n => starts[starts.len() - n],
            _ => 0,
        };
        let at_line_start = from == 0 || data[from - 1] == b'\n';
        (
            Self {
                since,
                timestamps: q.timestamps,
                at_line_start,
                // Inside a line `tailLines=0` left out: its rest is left out too.
                skipping: !at_line_start,
            },
            from,
        )
    }

    /// Renders `chunk`, the stamped log bytes from `offset`, into `out`.
    pub(crate) fn render(
        &mut self,
        chunk: &[u8],
        offset: u64,
        marks: &LogMarks,
        out: &mut Vec<u8>,
    ) {
        let mut pos = 0;
        while pos < chunk.len() {
            let end = chunk[pos..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(chunk.len(), |i| pos + i + 1);
            if self.at_line_start {
                let stamp = marks
                    .stamp_of(offset + pos as u64)
                    .unwrap_or_else(SystemTime::now);
                self.skipping = self.since.is_some_and(|s| stamp < s);
                if !self.skipping && self.timestamps {
                    out.extend_from_slice(format_stamp(stamp).as_bytes());
                    out.push(b' ');
                }
            }
            if !self.skipping {
                out.extend_from_slice(&chunk[pos..end]);
            }
            self.at_line_start = chunk[end - 1] == b'\n';
            pos = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_772_000_000_000 + ms)
    }

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    /// "a\n" seen at 0 ms, "b\nc" at 100 ms, the rest of "cc\n" at 200 ms; "d\n" not yet.
    fn marks() -> (LogMarks, &'static [u8]) {
        let mut m = LogMarks::default();
        m.record(at(0), 2);
        m.record(at(100), 5);
        m.record(at(150), 5);
        m.record(at(200), 7);
        (m, b"a\nb\ncc\nd\n")
    }

    fn render(query: &LogQuery) -> String {
        let (m, data) = marks();
        let data = &data[..usize::try_from(m.len()).unwrap()];
        let (mut r, from) = Renderer::start(query, data, &m);
        let mut out = Vec::new();
        r.render(&data[from..], from as u64, &m, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn bytes_are_stamped_by_the_first_sample_that_saw_them() {
        let (m, _) = marks();
        assert_eq!(m.len(), 7);
        assert_eq!(m.stamp_of(0), Some(at(0)));
        assert_eq!(m.stamp_of(1), Some(at(0)));
        assert_eq!(m.stamp_of(2), Some(at(100)));
        assert_eq!(m.stamp_of(4), Some(at(100)));
        assert_eq!(m.stamp_of(5), Some(at(200)));
        assert_eq!(m.stamp_of(7), None);
    }

    #[test]
    fn since_time_tail_lines_and_timestamps_select_whole_lines() {
        let now = at(1000);
        assert_eq!(render(&parse_query(&[], now).unwrap()), "a\nb\ncc\n");
        let since = parse_query(&q(&[("sinceTime", &format_stamp(at(50)))]), now).unwrap();
        assert_eq!(render(&since), "b\ncc\n");
        let tail = parse_query(&q(&[("tailLines", "1")]), now).unwrap();
        assert_eq!(render(&tail), "cc\n");
        let none = parse_query(&q(&[("tailLines", "0")]), now).unwrap();
        assert_eq!(render(&none), "");
        let stamped = parse_query(
            &q(&[("timestamps", "true"), ("sinceSeconds", "1")]),
            at(1050),
        )
        .unwrap();
        assert_eq!(
            render(&stamped),
            format!(
                "{} b\n{} cc\n",
                format_stamp(at(100)),
                format_stamp(at(100))
            )
        );
    }

    #[test]
    fn stamps_are_rfc3339_nano_without_trailing_zeros() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_772_000_000, 250_000_000);
        assert_eq!(format_stamp(t), "2026-02-25T06:13:20.25Z");
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_772_000_000, 0);
        assert_eq!(format_stamp(t), "2026-02-25T06:13:20Z");
    }

    #[test]
    fn unimplemented_or_invalid_parameters_are_refused_by_name() {
        let now = at(0);
        for (k, v, want) in [
            ("previous", "true", "\"previous\""),
            ("limitBytes", "10", "\"limitBytes\""),
            ("tailLines", "-1", "tailLines: Invalid value"),
            ("sinceSeconds", "0", "must be greater than 0"),
            ("sinceTime", "yesterday", "sinceTime: Invalid value"),
            ("follow", "maybe", "follow: Invalid value"),
        ] {
            let e = parse_query(&q(&[(k, v)]), now).unwrap_err();
            assert!(e.to_string().contains(want), "{k}={v}: {e}");
        }
        let e = parse_query(
            &q(&[("sinceSeconds", "5"), ("sinceTime", "2026-01-01T00:00:00Z")]),
            now,
        )
        .unwrap_err();
        assert!(e.to_string().contains("at most one"), "{e}");
    }
}
