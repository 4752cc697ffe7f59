//! The files of one stage run on the pod's shared volumes, and how they are written.

use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// One stage run: `<base>.started` (the start guard), `.pid` (the supervisor), `.log` (the
/// script's stdout and stderr), `.exit` (its code, or `error <message>` when it could not start).
#[derive(Debug, Clone)]
pub struct StageFiles {
    pub base: String,
    pub guard: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    pub exit: PathBuf,
}

impl StageFiles {
    pub fn new(base: &str) -> Self {
        let with = |ext: &str| PathBuf::from(format!("{base}.{ext}"));
        Self {
            base: base.to_string(),
            guard: with("started"),
            pid: with("pid"),
            log: with("log"),
            exit: with("exit"),
        }
    }
}

/// What the exit file says, once it says anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The script ended with this code (128 + n for a signal, as a shell reports it).
    Code(i32),
    /// The stage could not be started; the message says why.
    Failed(String),
}

impl Outcome {
    fn encode(&self) -> String {
        match self {
            Self::Code(c) => format!("{c}\n"),
            Self::Failed(m) => format!("error {}\n", m.replace('\n', " ")),
        }
    }

    /// The exit file's content; `None` while it is missing or empty.
    pub fn read(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let line = text.lines().next()?.trim();
        if let Some(msg) = line.strip_prefix("error ") {
            return Some(Self::Failed(msg.to_string()));
        }
        // A code that does not parse is a broken record: a launch failure, not a success.
        Some(line.parse().map_or_else(
            |_| Self::Failed(format!("unreadable exit record {line:?}")),
            Self::Code,
        ))
    }

    /// Records the outcome atomically (temp file, then rename), so a reader sees all or nothing.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("exit.tmp");
        let written =
            write_new(&tmp, self.encode().as_bytes()).and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// Creates (or truncates) `path` with `data`.
pub fn write_new(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(data)?;
    f.flush()
}

/// The pid in a pid file, once it holds one.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
}
