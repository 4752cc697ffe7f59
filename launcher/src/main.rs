//! `spotrun-launch`: the executor's program inside the job pod. An init container copies it from
//! the spotrun image into a shared volume, so a stage needs nothing from the job image but `sh`.
//!
//! ```text
//! spotrun-launch start <base> --script <path> --size <n> [--follow] [<ownership>]   (script on stdin)
//! spotrun-launch follow <base> --offset <n>
//! spotrun-launch kill <base>
//! spotrun-launch supervise <base> --script <path> [<ownership>]       (started by `start`)
//! spotrun-launch idle                                                 (the build container's pid 1)
//! spotrun-launch install <dir>                                        (the init container)
//! spotrun-launch owner <file>                                         (records uid:gid of the caller)
//! ```
//! `<base>` names the stage run's files: `<base>.started`, `.pid`, `.log`, `.exit`. A helper
//! stage's `<ownership>` is `--umask <octal>`, or `--owner-file <file>` with `--chown-tree <dir>`
//! (repeatable): see `ownership.rs`.

mod files;
mod follow;
mod idle;
mod install;
mod kill;
mod ownership;
mod proctree;
mod start;
mod supervise;

use std::path::PathBuf;
use std::process::ExitCode;

use files::StageFiles;
use ownership::StageOwnership;
use start::{StartError, Started};

const VERSION: &str = env!("SPOTRUN_VERSION");

/// Exit code of `start` when the script arrived incomplete (`EX_TEMPFAIL`: try again).
const CUT: u8 = 75;
/// Exit code of a launch that failed for good (`EX_SOFTWARE`); stderr has `FAILED <why>`.
const FAILED: u8 = 70;
/// Exit code of a command line we do not understand (`EX_USAGE`).
const USAGE: u8 = 64;

/// The command line: a subcommand, one positional argument, `--flag value` pairs and flags.
struct Args {
    command: String,
    target: String,
    values: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Args {
    fn parse(mut raw: impl Iterator<Item = String>) -> Option<Self> {
        let command = raw.next()?;
        let mut args = Self {
            command,
            target: String::new(),
            values: Vec::new(),
            flags: Vec::new(),
        };
        while let Some(a) = raw.next() {
            match a.as_str() {
                "--follow" => args.flags.push(a),
                "--script" | "--size" | "--offset" | "--umask" | "--owner-file"
                | "--chown-tree" => {
                    args.values.push((a, raw.next()?));
                }
                _ if a.starts_with("--") => return None,
                _ if args.target.is_empty() => args.target = a,
                _ => return None,
            }
        }
        Some(args)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.value(key)?.parse().ok()
    }

    /// The ownership flags; `None` when `--umask` is not octal.
    fn ownership(&self) -> Option<StageOwnership> {
        let umask = match self.value("--umask") {
            Some(m) => Some(u32::from_str_radix(m, 8).ok().filter(|m| *m <= 0o777)?),
            None => None,
        };
        Some(StageOwnership {
            umask,
            owner_file: self.value("--owner-file").map(PathBuf::from),
            trees: self
                .values
                .iter()
                .filter(|(k, _)| k == "--chown-tree")
                .map(|(_, v)| PathBuf::from(v))
                .collect(),
        })
    }
}

fn main() -> ExitCode {
    let Some(args) = Args::parse(std::env::args().skip(1)) else {
        return usage();
    };
    let files = StageFiles::new(&args.target);
    match args.command.as_str() {
        "--version" => {
            println!("spotrun-launch {VERSION}");
            ExitCode::SUCCESS
        }
        "idle" => idle::idle(),
        "install" if !args.target.is_empty() => install::install(&PathBuf::from(&args.target)),
        "kill" if !args.target.is_empty() => {
            kill::kill(&files);
            ExitCode::SUCCESS
        }
        "follow" if !args.target.is_empty() => match args.number("--offset") {
            Some(offset) => follow::follow(&files, offset, None),
            None => usage(),
        },
        "owner" if !args.target.is_empty() => {
            match ownership::record(&PathBuf::from(&args.target)) {
                Ok(me) => {
                    println!("{}:{}", me.uid, me.gid);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "spotrun-launch: recording the owner in {}: {e}",
                        args.target
                    );
                    ExitCode::from(FAILED)
                }
            }
        }
        "supervise" if !args.target.is_empty() => {
            match (args.value("--script"), args.ownership()) {
                (Some(script), Some(ownership)) => {
                    supervise::supervise(&files, script.as_ref(), &ownership)
                }
                _ => usage(),
            }
        }
        "start" if !args.target.is_empty() => {
            let (Some(script), Some(size), Some(ownership)) = (
                args.value("--script"),
                args.number("--size"),
                args.ownership(),
            ) else {
                return usage();
            };
            let follow = args.flags.iter().any(|f| f == "--follow");
            match start::start(&files, script.as_ref(), size, &ownership) {
                Ok(Started::Now(child)) if follow => follow::follow(&files, 0, Some(child)),
                Ok(Started::Before) if follow => follow::follow(&files, 0, None),
                Ok(_) => ExitCode::SUCCESS,
                Err(StartError::Cut { got, size }) => {
                    eprintln!(
                        "spotrun-launch: the script arrived incomplete ({got} of {size} bytes); nothing was started"
                    );
                    ExitCode::from(CUT)
                }
                Err(StartError::Failed(msg)) => {
                    eprintln!("FAILED {msg}");
                    ExitCode::from(FAILED)
                }
            }
        }
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: spotrun-launch start|follow|kill|supervise <base> [...] | idle | install <dir> | owner <file> | --version"
    );
    ExitCode::from(USAGE)
}
