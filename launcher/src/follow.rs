//! `follow`: streams the stage log from a byte offset until the exit file has the outcome.
//!
//! Protocol on stderr (the executor parses it): `EXIT <code>` once the script ended; `FAILED
//! <message>` when the stage could not be started; `LOST` when the supervisor is gone without
//! recording anything (killed from outside); a `.` every ~2 s as a heartbeat, which lets the
//! executor tell a silent script from a dead stream. stdout carries the log bytes only.

use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::process::{Child, ExitCode};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::files::{Outcome, StageFiles, read_pid};
use crate::proctree;

/// How long the supervisor may be gone (or missing) with nothing recorded before the stage is
/// reported lost or failed: long enough for a record in flight to land.
const GONE_LIMIT: Duration = Duration::from_secs(3);
/// How long after the start guard exists the supervisor may take to write its pid.
const NO_PID_LIMIT: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_secs(2);

/// The pause between polls: short while a stage is young (most of the runner's own stages end
/// within milliseconds, and each poll is two `stat`-sized syscalls), longer later.
fn poll_interval(age: Duration) -> Duration {
    if age < Duration::from_millis(200) {
        Duration::from_millis(2)
    } else if age < Duration::from_secs(2) {
        Duration::from_millis(10)
    } else {
        Duration::from_millis(50)
    }
}

/// Follows from `offset`. `supervisor` is set when this process started the stage: a thread then
/// waits for it (reaping it), and its end wakes the loop at once, so a short stage ends without
/// polling latency (P9 in BENCHMARKS.md); later followers poll.
pub fn follow(files: &StageFiles, offset: u64, supervisor: Option<Child>) -> ExitCode {
    let mut ended = supervisor.map(|mut child| {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let _ = child.wait();
            let _ = tx.send(());
        });
        rx
    });
    let began = Instant::now();
    let mut log: Option<File> = None;
    let mut pid: Option<i32> = None;
    let mut gone_since: Option<Instant> = None;
    let mut last_beat = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let stdout = io::stdout();
    let mut stderr = io::stderr();
    loop {
        // Read the outcome first, then the log to its end: the script's output is complete
        // before its exit code is recorded, so nothing written before the record is missed.
        let outcome = Outcome::read(&files.exit);
        if log.is_none() {
            log = File::open(&files.log)
                .and_then(|mut f| f.seek(SeekFrom::Start(offset)).map(|_| f))
                .ok();
        }
        if let Some(f) = log.as_mut()
            && copy_available(f, &mut buf, &mut stdout.lock()).is_err()
        {
            // Nobody reads our stdout any more: the exec is gone.
            return ExitCode::FAILURE;
        }
        if let Some(outcome) = outcome {
            let line = match outcome {
                Outcome::Code(c) => format!("EXIT {c}\n"),
                Outcome::Failed(m) => format!("FAILED {m}\n"),
            };
            let _ = stderr.write_all(line.as_bytes());
            return ExitCode::SUCCESS;
        }
        if pid.is_none() {
            pid = read_pid(&files.pid);
        }
        let now = Instant::now();
        let gone = if let Some(p) = pid {
            !proctree::alive(p)
        } else {
            // No supervisor yet: fine while the start may still be on its way.
            let since = std::fs::metadata(&files.guard)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            since.max(began.elapsed()) >= NO_PID_LIMIT
        };
        if gone {
            let since = *gone_since.get_or_insert(now);
            let limit = if pid.is_some() {
                GONE_LIMIT
            } else {
                Duration::ZERO
            };
            if now.duration_since(since) >= limit && Outcome::read(&files.exit).is_none() {
                let line = if pid.is_some() {
                    "LOST\n".to_string()
                } else {
                    "FAILED the stage was never started: no supervisor wrote its pid\n".to_string()
                };
                let _ = stderr.write_all(line.as_bytes());
                return ExitCode::SUCCESS;
            }
        } else {
            gone_since = None;
        }
        if now.duration_since(last_beat) >= HEARTBEAT {
            let _ = stderr.write_all(b".");
            last_beat = now;
        }
        let pause = poll_interval(began.elapsed());
        match ended.as_ref().map(|rx| rx.recv_timeout(pause)) {
            // The supervisor ended (or its waiter is gone): from now on, plain polls.
            Some(Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected)) => ended = None,
            Some(Err(mpsc::RecvTimeoutError::Timeout)) => {}
            None => std::thread::sleep(pause),
        }
    }
}

/// Copies what the log holds beyond the current position to `out`.
fn copy_available(f: &mut File, buf: &mut [u8], out: &mut impl io::Write) -> io::Result<()> {
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            return out.flush();
        }
        out.write_all(&buf[..n])?;
    }
}
