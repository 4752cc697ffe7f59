//! `supervise`: the detached process that runs the stage script and records its exit code.
//!
//! It leads its own session (no signal aimed at the exec that started it reaches it) and is a
//! child subreaper: orphans of the script (double forks, daemons) are reparented to it rather
//! than to the container's pid 1, so the whole tree stays below it for `kill` to find.
//!
//! For a helper stage it also sets the script's umask or, once the script ended and before its
//! exit code is recorded, hands the files it wrote to the build container's user
//! (`ownership.rs`): the next stage, started once the code is recorded, finds them handed over.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use nix::errno::Errno;
use nix::sys::wait::{WaitStatus, wait};
use nix::unistd::Pid;

use crate::files::{Outcome, StageFiles, write_new};
use crate::ownership::StageOwnership;

pub fn supervise(files: &StageFiles, script: &Path, ownership: &StageOwnership) -> ExitCode {
    // Fails only when already a group leader, which a freshly spawned process is not.
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_child_subreaper(true);
    match run(files, script, ownership) {
        Ok(code) => {
            if let Some(warning) = ownership.hand_over() {
                append_line(&files.log, &warning);
            }
            record(files, &Outcome::Code(code))
        }
        Err(msg) => record(files, &Outcome::Failed(msg)),
    }
}

/// One line at the end of the stage log (best effort: the log is where the job sees it).
fn append_line(log: &Path, line: &str) {
    if let Ok(mut f) = OpenOptions::new().append(true).open(log) {
        let _ = writeln!(f, "{line}");
    }
}

fn record(files: &StageFiles, outcome: &Outcome) -> ExitCode {
    // Unrecorded, followers see the supervisor gone without a code and report it lost.
    if outcome.write(&files.exit).is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(files: &StageFiles, script: &Path, ownership: &StageOwnership) -> Result<i32, String> {
    write_new(&files.pid, format!("{}\n", std::process::id()).as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", files.pid.display()))?;
    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&files.log)
        .map_err(|e| format!("cannot open the stage log {}: {e}", files.log.display()))?;
    let err = log
        .try_clone()
        .map_err(|e| format!("cannot share the stage log: {e}"))?;
    let shell = shell();
    ownership.apply_umask();
    let inherited = std::env::var("GIT_CONFIG_COUNT").ok();
    let child = Command::new(&shell)
        .arg(script)
        .envs(ownership.git_env(inherited.as_deref()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own process group: a TERM to the script's group never hits this supervisor.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {} to run the stage script: {e} (the job image needs sh)",
                shell.display()
            )
        })?;
    let script_pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // Reaps every child (reparented orphans included) until the script itself ends.
    loop {
        match wait() {
            Ok(WaitStatus::Exited(pid, code)) if pid == script_pid => return Ok(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == script_pid => {
                return Ok(128 + sig as i32);
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("lost track of the stage script: {e}")),
        }
    }
}

/// bash when the image has it (the runner writes its scripts for bash), else sh.
fn shell() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("bash"))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| PathBuf::from("sh"))
}
