//! The command lines of `spotrun-launch`, the executor's program inside the pod (`launcher/`),
//! and what its stderr reports. Every stage exec runs it directly: no shell, no coreutils.

use crate::failure::Failure;
use crate::plan::LAUNCHER;

/// Files of one stage run inside the pod: the script, and the base the launcher derives the
/// others from (`<base>.started`, `.pid`, `.log`, `.exit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePaths {
    pub script: String,
    pub base: String,
}

impl StagePaths {
    #[must_use]
    pub fn new(scripts_dir: &str, logs_dir: &str, stage: &str, run_id: &str) -> Self {
        Self {
            script: format!("{}/{stage}-{run_id}.sh", scripts_dir.trim_end_matches('/')),
            base: format!("{}/{stage}-{run_id}", logs_dir.trim_end_matches('/')),
        }
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    std::iter::once(LAUNCHER)
        .chain(words.iter().copied())
        .map(str::to_string)
        .collect()
}

/// The file in the logs volume (shared by build and helper, writable by both) where `owner`
/// records the build container's `uid:gid`.
#[must_use]
pub fn owner_file(logs_dir: &str) -> String {
    format!("{}/build-owner", logs_dir.trim_end_matches('/'))
}

/// What a helper stage does about the owner of the files it writes (`[pod]
/// helper_file_ownership`), so that a build container running as another user can change them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FileHandover {
    /// Nothing: a build-container stage, or a helper stage whose files the build does not use.
    #[default]
    Nothing,
    /// Once the script ended (before its code is recorded), give these trees to the user
    /// recorded in `owner_file`.
    Chown {
        owner_file: String,
        trees: Vec<String>,
    },
    /// The script runs with `umask 0000`.
    Umask,
}

/// Reads the script (exactly `size` bytes) from stdin and starts it at most once; with `follow`
/// it then streams the log like `follow_argv(p, 0)`. The length, not the end of stdin, ends the
/// upload (an exec without the v5 protocol never closes stdin), and a cut upload starts nothing.
#[must_use]
pub fn start_argv(p: &StagePaths, size: usize, follow: bool, files: &FileHandover) -> Vec<String> {
    let size = size.to_string();
    let mut words = vec!["start", &p.base, "--script", &p.script, "--size", &size];
    if follow {
        words.push("--follow");
    }
    match files {
        FileHandover::Nothing => {}
        FileHandover::Umask => words.extend(["--umask", "0000"]),
        FileHandover::Chown { owner_file, trees } => {
            words.extend(["--owner-file", owner_file.as_str()]);
            for t in trees {
                words.extend(["--chown-tree", t.as_str()]);
            }
        }
    }
    argv(&words)
}

/// Records the caller's `uid:gid` in `file` (run in the build container) and prints it.
#[must_use]
pub fn owner_argv(file: &str) -> Vec<String> {
    argv(&["owner", file])
}

/// Streams the log from byte `offset` until the outcome is recorded.
#[must_use]
pub fn follow_argv(p: &StagePaths, offset: u64) -> Vec<String> {
    argv(&["follow", &p.base, "--offset", &offset.to_string()])
}

/// Stops the stage's whole process tree (TERM, then KILL); prevents a start still on its way.
#[must_use]
pub fn kill_argv(p: &StagePaths) -> Vec<String> {
    argv(&["kill", &p.base])
}

/// What the launcher's stderr says about the stage (its last report line; `.`s are heartbeats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The script ended with this code.
    Exit(i32),
    /// The stage could not be started (no space for its files, no shell, ...).
    Failed(String),
    /// The supervisor is gone without recording an outcome (killed from outside the job).
    Lost,
}

#[must_use]
pub fn report(stderr: &[u8]) -> Option<Report> {
    let text = String::from_utf8_lossy(stderr);
    text.lines().rev().find_map(|line| {
        let line = line.trim_start_matches('.');
        if let Some(code) = line.strip_prefix("EXIT ") {
            return code.trim().parse().ok().map(Report::Exit);
        }
        if let Some(msg) = line.strip_prefix("FAILED ") {
            return Some(Report::Failed(msg.trim().to_string()));
        }
        (line == "LOST").then_some(Report::Lost)
    })
}

/// The system failure for a stage the launcher could not start.
#[must_use]
pub fn start_failure(pod: &str, container: &str, why: &str) -> Failure {
    Failure::System(format!(
        "the stage could not be started in {pod}/{container}: {why}"
    ))
}

/// The system failure for a script that ended without recording its exit code.
#[must_use]
pub fn lost_failure(pod: &str, container: &str) -> Failure {
    Failure::System(format!(
        "the stage's script in {pod}/{container} ended without recording an exit code \
         (the process waiting for it was killed from outside the job)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        let p = StagePaths::new("/scripts/", "/logs", "build_script", "0a1b2c3d");
        assert_eq!(p.script, "/scripts/build_script-0a1b2c3d.sh");
        assert_eq!(
            start_argv(&p, 42, true, &FileHandover::Nothing),
            [
                LAUNCHER,
                "start",
                "/logs/build_script-0a1b2c3d",
                "--script",
                "/scripts/build_script-0a1b2c3d.sh",
                "--size",
                "42",
                "--follow"
            ]
        );
        let chown = FileHandover::Chown {
            owner_file: owner_file("/logs/"),
            trees: vec!["/builds/g/p".into(), "/builds/g/p.tmp".into()],
        };
        assert_eq!(
            start_argv(&p, 42, false, &chown)[7..],
            [
                "--owner-file",
                "/logs/build-owner",
                "--chown-tree",
                "/builds/g/p",
                "--chown-tree",
                "/builds/g/p.tmp"
            ]
        );
        assert_eq!(
            start_argv(&p, 42, false, &FileHandover::Umask)[7..],
            ["--umask", "0000"]
        );
        assert_eq!(
            owner_argv("/logs/build-owner"),
            [LAUNCHER, "owner", "/logs/build-owner"]
        );
        assert_eq!(
            follow_argv(&p, 7),
            [
                LAUNCHER,
                "follow",
                "/logs/build_script-0a1b2c3d",
                "--offset",
                "7"
            ]
        );
        assert_eq!(
            kill_argv(&p),
            [LAUNCHER, "kill", "/logs/build_script-0a1b2c3d"]
        );
    }

    #[test]
    fn reports() {
        assert_eq!(report(b"..EXIT 42\n"), Some(Report::Exit(42)));
        assert_eq!(report(b"EXIT 0\n"), Some(Report::Exit(0)));
        assert_eq!(report(b"...."), None);
        assert_eq!(report(b"EXIT \n"), None);
        assert_eq!(report(b".LOST\n"), Some(Report::Lost));
        assert_eq!(
            report(b"FAILED cannot write /logs/x.sh: No space left on device (os error 28)\n"),
            Some(Report::Failed(
                "cannot write /logs/x.sh: No space left on device (os error 28)".into()
            ))
        );
    }
}
