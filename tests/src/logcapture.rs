//! Log capture for the secrets check: when `SPOTRUN_LOG_CAPTURE_DIR` is set, test harnesses write every
//! proxy and executor log they see into it and register the secrets they used; `spotrun-log-scan`
//! then fails if any secret or request signature shows up in a captured log.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The environment variable naming the capture directory; nothing is captured when it is unset.
pub const ENV: &str = "SPOTRUN_LOG_CAPTURE_DIR";
/// File (inside the capture dir) listing registered secrets, hex-encoded, one per line.
pub const SECRETS_FILE: &str = "secrets.list";
/// Registered secrets shorter than this are ignored: they would match ordinary words.
pub const MIN_SECRET_LEN: usize = 6;

/// The capture directory, created if needed; `None` when capturing is off.
#[must_use]
pub fn dir() -> Option<PathBuf> {
    let d = PathBuf::from(std::env::var_os(ENV).filter(|v| !v.is_empty())?);
    std::fs::create_dir_all(&d).ok()?;
    Some(d)
}

/// Record a value that must never appear in any captured log.
pub fn register_secret(secret: &str) {
    let Some(d) = dir() else { return };
    if secret.len() < MIN_SECRET_LEN {
        return;
    }
    // One short append per call: concurrent test processes interleave whole lines.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join(SECRETS_FILE))
    {
        let _ = f.write_all(format!("{}\n", hex(secret.as_bytes())).as_bytes());
    }
}

/// A new file for one log stream (`<name>-<pid>-<random>.log`), or `None` when capturing is off.
#[must_use]
pub fn create(name: &str) -> Option<std::fs::File> {
    let d = dir()?;
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let path = d.join(format!(
        "{safe}-{}-{:08x}.log",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::File::create(path).ok()
}

/// Write one finished log (e.g. an executor run's output) to the capture dir.
pub fn write(name: &str, content: &[u8]) {
    if let Some(mut f) = create(name) {
        let _ = f.write_all(content);
    }
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// One leak found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// 1-based line number.
    pub line: usize,
    /// What leaked, without repeating the secret (`registered secret #3`, `request signature`).
    pub what: String,
}

/// Markers after which 64 hex digits are a `SigV4` signature: `X-Amz-Signature=` in URLs,
/// `Signature=` in `Authorization` headers, `chunk-signature=` in aws-chunked bodies; plus the
/// URL-encoded and JSON-field spellings.
const SIGNATURE_MARKERS: &[&str] = &[
    "signature=",
    "signature%3d",
    "signature\":\"",
    "signature: ",
];

/// Find secrets and signatures in `text` (pure; `secrets` are the registered values).
#[must_use]
pub fn scan(text: &str, secrets: &[String]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for (i, s) in secrets.iter().enumerate() {
            if s.len() >= MIN_SECRET_LEN && line.contains(s.as_str()) {
                out.push(Finding {
                    line: n + 1,
                    what: format!("registered secret #{}", i + 1),
                });
            }
        }
        let lower = line.to_ascii_lowercase();
        for marker in SIGNATURE_MARKERS {
            let mut from = 0;
            while let Some(p) = lower[from..].find(marker) {
                let start = from + p + marker.len();
                let hexlen = lower[start..]
                    .bytes()
                    .take_while(u8::is_ascii_hexdigit)
                    .count();
                if hexlen >= 64 {
                    out.push(Finding {
                        line: n + 1,
                        what: "request signature".into(),
                    });
                }
                from = start;
            }
        }
    }
    out
}

/// The registered secrets of a capture dir.
pub fn read_secrets(dir: &Path) -> std::io::Result<Vec<String>> {
    let text = match std::fs::read_to_string(dir.join(SECRETS_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut secrets: Vec<String> = text.lines().filter_map(unhex).collect();
    secrets.sort();
    secrets.dedup();
    Ok(secrets)
}

/// Scan every captured log in `dir` (recursively) for the registered secrets and any signature:
/// (file, finding) pairs, plus the number of files scanned.
pub fn scan_dir(dir: &Path) -> std::io::Result<(Vec<(PathBuf, Finding)>, usize)> {
    let secrets = read_secrets(dir)?;
    let mut findings = Vec::new();
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.file_name().is_some_and(|n| n == SECRETS_FILE) {
                continue;
            }
            files += 1;
            let text = String::from_utf8_lossy(&std::fs::read(&path)?).into_owned();
            findings.extend(scan(&text, &secrets).into_iter().map(|f| (path.clone(), f)));
        }
    }
    Ok((findings, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: &str = "3c6f1e0a9d1b7c2e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80912";

    #[test]
    fn finds_registered_secrets_and_signatures() {
        let secrets = vec!["runner-secret-0123456789".to_owned(), "short".to_owned()];
        let log = format!(
            "{{\"msg\":\"ok\"}}\nGET /b/k?X-Amz-Date=1&X-Amz-Signature={SIG}\nauth: AWS4-HMAC-SHA256 Credential=a/b, SignedHeaders=host, Signature={SIG}\nkey runner-secret-0123456789 here\nshort is too short to count\nsha256 {SIG} is a content hash\n\"x-amz-signature\":\"{SIG}\"\n"
        );
        let f = scan(&log, &secrets);
        assert_eq!(
            f,
            vec![
                Finding {
                    line: 2,
                    what: "request signature".into()
                },
                Finding {
                    line: 3,
                    what: "request signature".into()
                },
                Finding {
                    line: 4,
                    what: "registered secret #1".into()
                },
                Finding {
                    line: 7,
                    what: "request signature".into()
                },
            ]
        );
        assert!(scan("Signature=abc (not a whole signature)\n", &secrets).is_empty());
    }

    #[test]
    fn scan_dir_catches_a_planted_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(SECRETS_FILE),
            format!(
                "{}\n{}\n",
                hex(b"planted-secret-value"),
                hex(b"other-secret")
            ),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("clean.log"), "nothing to see\n").unwrap();
        let (f, files) = scan_dir(dir.path()).unwrap();
        assert_eq!((f.len(), files), (0, 1));
        std::fs::write(
            dir.path().join("sub/leak.log"),
            "line one\nuploading with planted-secret-value\n",
        )
        .unwrap();
        let (f, files) = scan_dir(dir.path()).unwrap();
        assert_eq!(files, 2);
        assert_eq!(f.len(), 1);
        assert!(f[0].0.ends_with("sub/leak.log"));
        assert_eq!(
            f[0].1,
            Finding {
                line: 2,
                what: "registered secret #2".into()
            }
        );
    }
}
