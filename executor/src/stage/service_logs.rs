//! `CI_DEBUG_SERVICES`: while a stage runs in the build container, every service container's log
//! is followed (`pods/log`) and copied into the job log, one whole line at a time, as GitLab's
//! Kubernetes executor does: `[service:<image>-<alias>] <kubelet timestamp> <line>`.
//!
//! Each stage is its own process, so the stages share the log out by time: the first user stage
//! (`build_script`) copies it from the container's start (the service's start-up lines), a later
//! one from its own start, by the kubelet's line timestamps, so a line is copied once. Lines a
//! service writes while no build stage runs (between two stages, during the helper's cache and
//! artifact stages) are not copied. The lines are the user's own output (gitlab-runner masks the
//! job log); nothing of them goes into our events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{AsyncBufRead, AsyncBufReadExt as _};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, LogParams};
use serde_json::json;
use tokio::task::JoinHandle;

use super::joblog::{JobLog, LINE_PATIENCE};
use super::stage_container;
use crate::Ctx;
use crate::job::{CustomEnv, ImageSpec};
use crate::kubeapi::Kube;
use crate::plan::{BUILD_CONTAINER, service_container_names};
use crate::podstate;
use crate::prepare::say;

/// The job variable that turns the copy on.
pub const DEBUG_SERVICES_VAR: &str = "CI_DEBUG_SERVICES";

/// The first user stage, as `run_exec` receives it (`build_script`) or as it is named in the job.
const FIRST_USER_STAGES: [&str; 2] = ["build_script", "step_script"];

/// After the stage ends, lines still in flight get this long once the streams fall quiet...
const DRAIN_QUIET: Duration = Duration::from_millis(200);
/// ...and never longer than this in all.
const DRAIN_MAX: Duration = Duration::from_millis(500);

/// Longest piece of a line copied at once: a longer line is copied in pieces.
const MAX_LINE: usize = 64 * 1024;

/// Stream ends in a row (without a line copied in between) before a service's copy gives up.
const MAX_RECONNECTS: u32 = 5;

/// Whether the job asked for service logs: the runner reads the variable as a Go boolean
/// (`strconv.ParseBool`).
#[must_use]
pub fn enabled(env: &CustomEnv) -> bool {
    matches!(
        env.get(DEBUG_SERVICES_VAR),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True")
    )
}

/// The name in a service's line prefix: its image without tag or digest, then its aliases, joined
/// by `-` (`python:3.13` with alias `db` gives `python-db`). The Kubernetes executor cuts the
/// image at its first `:`, which also drops everything after a registry port; we cut the tag.
#[must_use]
pub fn service_label(svc: &ImageSpec) -> String {
    let image = svc.name.split('@').next().unwrap_or(&svc.name);
    let image = match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    };
    std::iter::once(image)
        .chain(svc.alias.split([' ', ',']).filter(|a| !a.is_empty()))
        .collect::<Vec<_>>()
        .join("-")
}

/// Which part of the service logs a stage copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Everything from the container's start: the first user stage, which shows the start-up.
    FromStart,
    /// Lines stamped at or after this instant, the stage's start: the lines copied by an
    /// earlier stage are older.
    Since(Timestamp),
}

/// The window of `stage`, or `None` for a stage that copies nothing (the helper's stages).
#[must_use]
pub fn window(stage: &str, stage_start: Timestamp) -> Option<Window> {
    if stage_container(stage) != BUILD_CONTAINER {
        return None;
    }
    Some(if FIRST_USER_STAGES.contains(&stage) {
        Window::FromStart
    } else {
        Window::Since(stage_start)
    })
}

/// The kubelet's timestamp at the start of a `timestamps=true` line, if it has one.
fn stamp_of(line: &[u8]) -> Option<Timestamp> {
    let space = line.iter().take(40).position(|&b| b == b' ')?;
    std::str::from_utf8(&line[..space]).ok()?.parse().ok()
}

/// The job-log line for one line of a service's log (its stamp kept, as the Kubernetes executor
/// shows it); a line cut short (the stream ended inside it) gets its newline.
fn job_log_line(label: &str, line: &[u8]) -> Vec<u8> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let mut out = Vec::with_capacity(label.len() + body.len() + 12);
    out.extend_from_slice(b"[service:");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"] ");
    out.extend_from_slice(body);
    out.push(b'\n');
    out
}

/// Which lines of a (re)connected stream are new: those stamped at or after the window's start,
/// minus those an earlier connection of this stage copied. Stamps never decrease within a
/// container's log, but several lines may share one, so the copies at the last stamp are counted.
#[derive(Debug, Default)]
struct Cursor {
    since: Option<Timestamp>,
    last: Option<Timestamp>,
    /// Lines copied with stamp `last`.
    at_last: usize,
    /// Lines at stamp `last` this connection still has to pass over.
    skip_at_last: usize,
}

impl Cursor {
    fn new(window: Window) -> Self {
        Self {
            since: match window {
                Window::FromStart => None,
                Window::Since(t) => Some(t),
            },
            ..Self::default()
        }
    }

    /// A new connection starts again at `since_time`: it repeats the lines at the last stamp.
    fn reconnect(&mut self) {
        self.skip_at_last = self.at_last;
    }

    fn admit(&mut self, stamp: Option<Timestamp>) -> bool {
        // A piece of a long line, or a server without stamps: nothing to decide on.
        let Some(t) = stamp else { return true };
        if self.since.is_some_and(|s| t < s) {
            return false;
        }
        match self.last {
            Some(l) if t < l => false,
            Some(l) if t == l => {
                if self.skip_at_last > 0 {
                    self.skip_at_last -= 1;
                    return false;
                }
                self.at_last += 1;
                true
            }
            _ => {
                self.last = Some(t);
                self.at_last = 1;
                self.skip_at_last = 0;
                true
            }
        }
    }

    /// The `sinceTime` to ask for: the API takes whole seconds (kube rounds to the nearest one),
    /// so the first wanted second, rounded down; the lines before are dropped by [`Self::admit`].
    fn since_time(&self) -> Option<Timestamp> {
        self.last
            .or(self.since)
            .and_then(|t| Timestamp::from_second(t.as_second()).ok())
    }
}

/// The copies of one stage, one task per service container.
pub struct ServiceLogs {
    tasks: Vec<JoinHandle<()>>,
    /// When a line was last copied, in milliseconds since `base`.
    heard: Arc<AtomicU64>,
    base: Instant,
}

/// Starts copying the service logs for `stage` when the job asked for it and the stage runs in
/// the build container; `None` otherwise.
pub fn start(
    ctx: &Ctx,
    kube: &Kube,
    pod: &str,
    stage: &str,
    stage_start: Timestamp,
) -> Option<ServiceLogs> {
    if !enabled(&ctx.env) {
        return None;
    }
    let window = window(stage, stage_start)?;
    let job = match crate::prepare::load_job() {
        Ok(job) => job,
        Err(e) => {
            say(&format!(
                "WARNING: {DEBUG_SERVICES_VAR}: service logs are not shown: {e}"
            ));
            return None;
        }
    };
    if job.services.is_empty() {
        return None;
    }
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let logs = ServiceLogs {
        tasks: Vec::new(),
        heard: Arc::new(AtomicU64::new(0)),
        base: Instant::now(),
    };
    let names = service_container_names(&job.services);
    let tasks = job
        .services
        .iter()
        .zip(names)
        .map(|(svc, container)| {
            let copy = LogCopy {
                kube: kube.clone(),
                pods: pods.clone(),
                pod: pod.to_string(),
                container,
                label: service_label(svc),
                heard: logs.heard.clone(),
                base: logs.base,
            };
            tokio::spawn(copy.run(Cursor::new(window)))
        })
        .collect();
    Some(ServiceLogs { tasks, ..logs })
}

impl ServiceLogs {
    /// Ends the copies once the stage has ended: lines already on their way get a short, bounded
    /// drain, then the tasks are stopped and joined.
    pub async fn finish(self) {
        let end = self.base.elapsed();
        loop {
            if self.tasks.iter().all(JoinHandle::is_finished) {
                break;
            }
            let heard = Duration::from_millis(self.heard.load(Ordering::Relaxed));
            let wake = (end.max(heard) + DRAIN_QUIET).min(end + DRAIN_MAX);
            let now = self.base.elapsed();
            if now >= wake {
                break;
            }
            tokio::time::sleep(wake.saturating_sub(now).min(Duration::from_millis(50))).await;
        }
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The copy of one service container's log into the job log.
struct LogCopy {
    kube: Kube,
    pods: Api<Pod>,
    pod: String,
    container: String,
    label: String,
    heard: Arc<AtomicU64>,
    base: Instant,
}

impl LogCopy {
    /// Follows the log, reconnecting (with backoff) after a stream that ends while the service
    /// still runs; a service that stopped has nothing more to say. A copy that cannot go on says
    /// so in one warning line; it never fails the job.
    async fn run(self, mut cursor: Cursor) {
        let mut ends = 0u32;
        let mut first = true;
        loop {
            if !first {
                cursor.reconnect();
            }
            first = false;
            let params = LogParams {
                container: Some(self.container.clone()),
                follow: true,
                timestamps: true,
                since_time: cursor.since_time(),
                ..LogParams::default()
            };
            let (copied, error) = match self.pods.log_stream(&self.pod, &params).await {
                Ok(stream) => self.copy_lines(stream, &mut cursor).await,
                Err(e) => (0, Some(e.to_string())),
            };
            if copied > 0 {
                ends = 0;
            }
            let stopped = match self
                .kube
                .call("get pod", || self.pods.get_opt(&self.pod))
                .await
            {
                Ok(None) => true,
                Ok(Some(p)) => podstate::exited_services(&p)
                    .iter()
                    .any(|e| e.container == self.container),
                Err(_) => false,
            };
            ends += 1;
            match error {
                None if stopped => return,
                Some(e) if stopped || ends > MAX_RECONNECTS => return self.give_up(&e),
                None if ends > MAX_RECONNECTS => {
                    return self.give_up("the log stream keeps ending");
                }
                _ => {}
            }
            tokio::time::sleep(crate::kubeapi::backoff(ends, 200, 2000, None)).await;
        }
    }

    /// Copies whole lines until the stream ends; returns how many, and the error that ended it.
    async fn copy_lines(
        &self,
        mut stream: impl AsyncBufRead + Unpin,
        cursor: &mut Cursor,
    ) -> (usize, Option<String>) {
        let mut copied = 0;
        let mut line = Vec::new();
        loop {
            line.clear();
            match read_line(&mut stream, &mut line, MAX_LINE).await {
                Ok(0) => return (copied, None),
                Ok(_) => {}
                Err(e) => return (copied, Some(e.to_string())),
            }
            if !cursor.admit(stamp_of(&line)) {
                continue;
            }
            let out = job_log_line(&self.label, &line);
            self.heard.store(
                u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            while !JobLog::stdout().whole_line(&out, LINE_PATIENCE) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            copied += 1;
        }
    }

    fn give_up(&self, why: &str) {
        self.kube.events.warn(
            "service_log_failed",
            json!({ "container": self.container, "error": why }),
        );
        say(&format!(
            "WARNING: the log of service {} (container {}) is not shown from here on: {why}",
            self.label, self.container
        ));
    }
}

/// Reads one line (with its newline) into `buf`, at most `max` bytes: a longer line comes in
/// pieces. Returns the bytes read, 0 at the end of the stream.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(buf.len());
        }
        let room = max - buf.len();
        let window = &avail[..avail.len().min(room)];
        let take = window
            .iter()
            .position(|&b| b == b'\n')
            .map_or(window.len(), |i| i + 1);
        buf.extend_from_slice(&window[..take]);
        r.consume_unpin(take);
        if buf.ends_with(b"\n") || buf.len() >= max {
            return Ok(buf.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn svc(name: &str, alias: &str) -> ImageSpec {
        ImageSpec {
            name: name.into(),
            alias: alias.into(),
            ..ImageSpec::default()
        }
    }

    #[test]
    fn the_variable_is_read_as_a_go_boolean() {
        let env = |v: &str| {
            CustomEnv::from_vars([(format!("CUSTOM_ENV_{DEBUG_SERVICES_VAR}"), v.to_string())])
        };
        for on in ["true", "1", "TRUE", "True", "t"] {
            assert!(enabled(&env(on)), "{on}");
        }
        for off in ["", "false", "0", "yes", "trace", " true"] {
            assert!(!enabled(&env(off)), "{off}");
        }
        assert!(!enabled(&CustomEnv::default()));
    }

    #[test]
    fn labels_are_the_image_without_tag_then_the_aliases() {
        assert_eq!(service_label(&svc("python:3.13", "svc")), "python-svc");
        assert_eq!(service_label(&svc("redis", "")), "redis");
        assert_eq!(
            service_label(&svc(
                "registry.example.com:5000/g/db:1@sha256:ab",
                "db, primary"
            )),
            "registry.example.com:5000/g/db-db-primary"
        );
        assert_eq!(
            service_label(&svc("localhost:5000/pg", "a b")),
            "localhost:5000/pg-a-b"
        );
    }

    #[test]
    fn the_first_user_stage_copies_from_the_start_later_ones_from_their_own_start() {
        let t = ts("2026-03-01T10:00:00.5Z");
        assert_eq!(window("build_script", t), Some(Window::FromStart));
        assert_eq!(window("step_script", t), Some(Window::FromStart));
        assert_eq!(window("after_script", t), Some(Window::Since(t)));
        assert_eq!(window("step_release", t), Some(Window::Since(t)));
        for helper in [
            "get_sources",
            "restore_cache",
            "upload_artifacts_on_success",
        ] {
            assert_eq!(window(helper, t), None, "{helper}");
        }
    }

    #[test]
    fn lines_keep_their_stamp_behind_the_prefix() {
        let line = b"2026-03-01T10:00:01.25Z ready to accept connections\n";
        assert_eq!(stamp_of(line), Some(ts("2026-03-01T10:00:01.25Z")));
        assert_eq!(
            job_log_line("postgres-db", line),
            b"[service:postgres-db] 2026-03-01T10:00:01.25Z ready to accept connections\n"
        );
        assert_eq!(stamp_of(b"no stamp here\n"), None);
        assert_eq!(job_log_line("x", b"cut sh"), b"[service:x] cut sh\n");
    }

    #[test]
    fn a_later_stage_skips_lines_older_than_its_start_and_asks_for_whole_seconds() {
        let mut c = Cursor::new(Window::Since(ts("2026-03-01T10:00:05.7Z")));
        assert_eq!(c.since_time(), Some(ts("2026-03-01T10:00:05Z")));
        assert!(!c.admit(Some(ts("2026-03-01T10:00:05.1Z"))));
        assert!(c.admit(Some(ts("2026-03-01T10:00:05.7Z"))));
        assert!(c.admit(Some(ts("2026-03-01T10:00:06Z"))));
        assert!(c.admit(None));
        assert_eq!(Cursor::new(Window::FromStart).since_time(), None);
    }

    #[test]
    fn a_reconnection_passes_over_the_lines_already_copied_even_with_equal_stamps() {
        let mut c = Cursor::new(Window::FromStart);
        let (a, b) = (ts("2026-03-01T10:00:01Z"), ts("2026-03-01T10:00:02.5Z"));
        assert!(c.admit(Some(a)));
        assert!(c.admit(Some(b)));
        assert!(c.admit(Some(b)));
        c.reconnect();
        assert_eq!(c.since_time(), Some(ts("2026-03-01T10:00:02Z")));
        // The new connection repeats the second 2 and both lines stamped `b`, then goes on.
        assert!(!c.admit(Some(ts("2026-03-01T10:00:02.1Z"))));
        assert!(!c.admit(Some(b)));
        assert!(!c.admit(Some(b)));
        assert!(c.admit(Some(b)));
        assert!(c.admit(Some(ts("2026-03-01T10:00:03Z"))));
    }

    #[tokio::test]
    async fn long_lines_are_read_in_pieces() {
        let data: &[u8] = b"short\n0123456789abc\nend";
        let mut r = futures::io::BufReader::with_capacity(4, data);
        let mut got = Vec::new();
        loop {
            let mut buf = Vec::new();
            if read_line(&mut r, &mut buf, 8).await.unwrap() == 0 {
                break;
            }
            got.push(String::from_utf8(buf).unwrap());
        }
        assert_eq!(got, ["short\n", "01234567", "89abc\n", "end"]);
    }
}
