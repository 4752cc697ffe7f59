//! `kill`: stops a stage's whole process tree (a job cancel); harmless if it already ended.

use std::fs::OpenOptions;
use std::io;
use std::time::{Duration, Instant};

use crate::files::{Outcome, StageFiles, read_pid};
use crate::proctree;

/// What a shell reports for a script ended by SIGTERM.
const TERMINATED: i32 = 128 + 15;
/// Between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(1);

pub fn kill(files: &StageFiles) {
    // Take the start guard first: if this wins, a launch still on its way (a SIGTERM that came
    // before the pod got that far) will never start the script, and the exit file says so.
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&files.guard)
    {
        Ok(_) => {
            let _ = Outcome::Code(TERMINATED).write(&files.exit);
            return;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        // Cannot tell: look for a supervisor anyway.
        Err(_) => {}
    }
    // The launcher won the guard: its supervisor writes its pid right away.
    let deadline = Instant::now() + Duration::from_secs(1);
    let pid = loop {
        if let Some(pid) = read_pid(&files.pid) {
            break pid;
        }
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if Outcome::read(&files.exit).is_some() {
        return;
    }
    proctree::stop_descendants(pid, GRACE);
    // The supervisor records the script's signal exit; should it be gone too, record it here.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Outcome::read(&files.exit).is_none() && proctree::alive(pid) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    if Outcome::read(&files.exit).is_none() {
        let _ = Outcome::Code(TERMINATED).write(&files.exit);
    }
}
