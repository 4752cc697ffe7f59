//! `idle`: keeps the build container alive until the pod is deleted, as its pid 1: reaps the
//! orphans reparented to it and exits on SIGTERM or SIGINT. Needs nothing from the image (a
//! shell loop would need `sleep`, and spin without it).

use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

pub fn idle() -> ExitCode {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(sig);
    }
    // Blocked, then taken with sigwait: no handler needed. A pid 1 without a handler would
    // ignore SIGTERM altogether (the kernel protects a namespace's init).
    if set.thread_block().is_err() {
        return ExitCode::FAILURE;
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if status == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => return ExitCode::SUCCESS,
            Err(_) => {}
        }
    }
}
