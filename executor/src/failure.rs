//! The one failure classifier: every error ends as a build failure or a system failure here, and
//! `main` turns the result into the exit code the runner expects.

use std::path::Path;

/// How a subcommand failed, in the runner's terms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Failure {
    /// The job's own fault (bad knob, image not allowed, image pull failure): a build failure with
    /// exit status 1.
    #[error("{0}")]
    Job(String),
    /// The stage script exited non-zero: a build failure with its code.
    #[error("script exited with status {0}")]
    Script(i32),
    /// Infrastructure trouble (API, pod lost, missing exec status): a system failure, retryable by
    /// `retry: when: runner_system_failure`.
    #[error("{0}")]
    System(String),
    /// Spot preemption: a system failure whose retry goes to on-demand capacity.
    #[error("{0}")]
    Preempted(String),
    /// SIGTERM from the runner (cancel, abort, timeout).
    #[error("{0}")]
    Cancelled(String),
}

/// Exit codes announced by the runner (`BUILD_FAILURE_EXIT_CODE`, `SYSTEM_FAILURE_EXIT_CODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCodes {
    pub build: u8,
    pub system: u8,
}

impl ExitCodes {
    #[must_use]
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str, d: u8| env(k).and_then(|v| v.trim().parse().ok()).unwrap_or(d);
        Self {
            build: get("BUILD_FAILURE_EXIT_CODE", 1),
            system: get("SYSTEM_FAILURE_EXIT_CODE", 2),
        }
    }
}

/// What `main` must do for a result: the exit code, the code to write to `BUILD_EXIT_CODE_FILE`,
/// and the one line for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub exit_code: u8,
    pub build_exit_code: Option<i32>,
    pub line: Option<String>,
}

/// Decides the verdict of a subcommand result.
#[must_use]
pub fn verdict(result: &Result<(), Failure>, codes: ExitCodes) -> Verdict {
    match result {
        Ok(()) => Verdict {
            exit_code: 0,
            build_exit_code: None,
            line: None,
        },
        // The runner reads the real code from the file; rewrite it every time (it persists
        // across stages, so a stale code could otherwise be reported).
        Err(Failure::Script(n)) => Verdict {
            exit_code: codes.build,
            build_exit_code: Some(*n),
            line: None,
        },
        Err(Failure::Job(msg)) => Verdict {
            exit_code: codes.build,
            build_exit_code: Some(1),
            line: Some(format!("ERROR: {msg}")),
        },
        Err(Failure::System(msg) | Failure::Preempted(msg) | Failure::Cancelled(msg)) => Verdict {
            exit_code: codes.system,
            build_exit_code: None,
            line: Some(format!("ERROR: {msg}")),
        },
    }
}

/// Writes the code for the runner (a bare integer, first line).
pub fn write_build_exit_code(path: &Path, code: i32) -> std::io::Result<()> {
    std::fs::write(path, format!("{code}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODES: ExitCodes = ExitCodes {
        build: 1,
        system: 2,
    };

    #[test]
    fn verdicts() {
        assert_eq!(verdict(&Ok(()), CODES).exit_code, 0);
        let v = verdict(&Err(Failure::Script(42)), CODES);
        assert_eq!(
            (v.exit_code, v.build_exit_code, v.line),
            (1, Some(42), None)
        );
        let v = verdict(&Err(Failure::Job("image \"x\" not allowed".into())), CODES);
        assert_eq!((v.exit_code, v.build_exit_code), (1, Some(1)));
        for f in [
            Failure::System("pod gone".into()),
            Failure::Preempted("node n".into()),
            Failure::Cancelled("c".into()),
        ] {
            let v = verdict(&Err(f), CODES);
            assert_eq!((v.exit_code, v.build_exit_code), (2, None));
            assert!(v.line.unwrap().starts_with("ERROR: "));
        }
        let custom =
            ExitCodes::from_env(&|k| (k == "SYSTEM_FAILURE_EXIT_CODE").then(|| "7".to_string()));
        assert_eq!(
            custom,
            ExitCodes {
                build: 1,
                system: 7
            }
        );
        assert_eq!(
            verdict(&Err(Failure::System(String::new())), custom).exit_code,
            7
        );
    }
}
