//! `start`: receives the stage script on stdin and starts it at most once, detached from the
//! exec that delivered it.

use std::fs::OpenOptions;
use std::io::{self, Read as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::files::{Outcome, StageFiles, write_new};
use crate::ownership::StageOwnership;

/// How `start` ended.
#[derive(Debug)]
pub enum Started {
    /// This call started the stage; the supervisor is its child.
    Now(Child),
    /// An earlier call started it (a retried exec), or a cancel came first.
    Before,
}

/// Why `start` did not start the stage.
#[derive(Debug)]
pub enum StartError {
    /// Fewer bytes than announced arrived (the exec stream broke): nothing was touched, so the
    /// caller may simply try again.
    Cut { got: usize, size: usize },
    /// The stage cannot be started in this container (no space, no shell, ...). Recorded in the
    /// exit file where possible, so followers report it too.
    Failed(String),
}

/// Reads exactly `size` bytes: the exec protocol may never close stdin (no v5 close frame), so
/// the length, not EOF, ends the script.
fn read_script(size: usize) -> Result<Vec<u8>, StartError> {
    let mut script = vec![0u8; size];
    let mut got = 0;
    let mut stdin = io::stdin().lock();
    while got < size {
        match stdin.read(&mut script[got..]) {
            Ok(0) | Err(_) => return Err(StartError::Cut { got, size }),
            Ok(n) => got += n,
        }
    }
    Ok(script)
}

pub fn start(
    files: &StageFiles,
    script_path: &Path,
    size: usize,
    ownership: &StageOwnership,
) -> Result<Started, StartError> {
    let script = read_script(size)?;
    // The guard: an O_EXCL create. Only its winner writes the script and starts it, so a retried
    // launch never touches a running script, and a cancel that takes it first prevents the start.
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&files.guard)
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Started::Before),
        Err(e) => {
            return Err(StartError::Failed(format!(
                "cannot create {}: {e}",
                files.guard.display()
            )));
        }
    }
    launch(files, script_path, &script, ownership)
        .map(Started::Now)
        .map_err(|msg| {
            // Followers read the exit file; should even that fail, they find no supervisor and
            // report the stage failed after a few seconds.
            let _ = Outcome::Failed(msg.clone()).write(&files.exit);
            StartError::Failed(msg)
        })
}

fn launch(
    files: &StageFiles,
    script_path: &Path,
    script: &[u8],
    ownership: &StageOwnership,
) -> Result<Child, String> {
    write_new(script_path, script).map_err(|e| {
        format!(
            "cannot write the stage script {}: {e}",
            script_path.display()
        )
    })?;
    write_new(&files.log, b"")
        .map_err(|e| format!("cannot create the stage log {}: {e}", files.log.display()))?;
    let me =
        std::env::current_exe().map_err(|e| format!("cannot find spotrun-launch itself: {e}"))?;
    Command::new(me)
        .arg("supervise")
        .arg(&files.base)
        .arg("--script")
        .arg(script_path)
        .args(ownership.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the stage supervisor: {e}"))
}
