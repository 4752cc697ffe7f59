//! The job log during a stage: our stdout, shared by the stage's own output (raw chunks, as they
//! arrive) and whole lines from other sources (service logs), which never land inside a stage line.

use std::io::Write;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long a whole line waits for the stage to finish its current line before breaking it (a
/// progress bar redrawn with `\r` may never end its line).
pub const LINE_PATIENCE: Duration = Duration::from_secs(1);

pub struct JobLog<W> {
    inner: Mutex<Inner<W>>,
}

struct Inner<W> {
    out: W,
    /// Since when the stage's output ends inside a line (`None`: at a line start).
    mid_line_since: Option<Instant>,
}

impl JobLog<std::io::Stdout> {
    /// The process's job log: stdout, which gitlab-runner copies into the job log.
    pub fn stdout() -> &'static Self {
        static LOG: OnceLock<JobLog<std::io::Stdout>> = OnceLock::new();
        LOG.get_or_init(|| Self::new(std::io::stdout()))
    }
}

impl<W: Write> JobLog<W> {
    pub fn new(out: W) -> Self {
        Self {
            inner: Mutex::new(Inner {
                out,
                mid_line_since: None,
            }),
        }
    }

    /// Writes a chunk of the stage's output as is.
    pub fn stage_output(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = g.out.write_all(bytes);
        let _ = g.out.flush();
        g.mid_line_since = if bytes.ends_with(b"\n") {
            None
        } else {
            g.mid_line_since.or_else(|| Some(Instant::now()))
        };
    }

    /// Writes `line` (which ends with a newline) in one piece, unless the stage has been inside a
    /// line for less than `patience`: then nothing is written and the caller tries again later.
    /// After `patience` the stage's line is broken (a newline first), so the line still shows.
    pub fn whole_line(&self, line: &[u8], patience: Duration) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        // One write: stdout takes its own lock once per `write_all`, so no other line gets in.
        let _ = match g.mid_line_since {
            Some(since) if since.elapsed() < patience => return false,
            Some(_) => g.out.write_all(&[b"\n", line].concat()),
            None => g.out.write_all(line),
        };
        let _ = g.out.flush();
        g.mid_line_since = None;
        true
    }

    #[cfg(test)]
    fn into_inner(self) -> W {
        self.inner
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_line_waits_for_the_stage_line_to_end() {
        let log = JobLog::new(Vec::new());
        log.stage_output(b"$ make\nbuilding ");
        assert!(!log.whole_line(b"[service:db] ready\n", LINE_PATIENCE));
        log.stage_output(b"done\n");
        assert!(log.whole_line(b"[service:db] ready\n", LINE_PATIENCE));
        assert_eq!(
            String::from_utf8(log.into_inner()).unwrap(),
            "$ make\nbuilding done\n[service:db] ready\n"
        );
    }

    #[test]
    fn a_stage_line_left_open_longer_than_the_patience_is_broken() {
        let log = JobLog::new(Vec::new());
        log.stage_output(b"progress 10%\r");
        log.stage_output(b"progress 20%\r");
        assert!(log.whole_line(b"[service:db] ready\n", Duration::ZERO));
        log.stage_output(b"progress 30%\n");
        assert_eq!(
            String::from_utf8(log.into_inner()).unwrap(),
            "progress 10%\rprogress 20%\r\n[service:db] ready\nprogress 30%\n"
        );
    }
}
