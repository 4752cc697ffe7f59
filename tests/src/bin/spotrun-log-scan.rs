//! `spotrun-log-scan DIR`: fails (exit 1) when a log captured by the test suite holds a registered
//! secret or a request signature; run by test.sh after `cargo test` (see `spotrun_testkit::logcapture`).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: spotrun-log-scan DIR");
        return ExitCode::from(2);
    };
    let secrets = match spotrun_testkit::logcapture::read_secrets(&dir) {
        Ok(s) => s.len(),
        Err(e) => {
            eprintln!("spotrun-log-scan: reading {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    match spotrun_testkit::logcapture::scan_dir(&dir) {
        Ok((findings, files)) => {
            // An empty capture would make the check pass vacuously.
            if files == 0 || secrets == 0 {
                eprintln!(
                    "spotrun-log-scan: {} holds {files} logs and {secrets} registered secrets; was {} set for the tests?",
                    dir.display(),
                    spotrun_testkit::logcapture::ENV
                );
                return ExitCode::from(2);
            }
            for (path, f) in &findings {
                println!("{}:{}: {}", path.display(), f.line, f.what);
            }
            println!(
                "spotrun-log-scan: {files} logs, {secrets} registered secrets, {} findings",
                findings.len()
            );
            if findings.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("spotrun-log-scan: {e}");
            ExitCode::from(2)
        }
    }
}
