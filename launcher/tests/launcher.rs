//! `spotrun-launch` as the executor runs it in a pod, here as local processes: start detached,
//! follow from offsets, exit codes, cancels that stop whole process trees, launch failures.
//! Every command runs under `timeout`, so a broken loop fails its test instead of hanging it.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_spotrun-launch");

/// One stage run's paths in a temp dir.
struct Stage {
    dir: tempfile::TempDir,
    base: String,
    script: String,
}

impl Stage {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("build_script-0a1b").display().to_string();
        let script = dir
            .path()
            .join("build_script-0a1b.sh")
            .display()
            .to_string();
        Self { dir, base, script }
    }

    fn file(&self, ext: &str) -> String {
        format!("{}.{ext}", self.base)
    }

    fn exists(&self, ext: &str) -> bool {
        Path::new(&self.file(ext)).exists()
    }

    /// `start` with `script` on stdin.
    fn start(&self, script: &[u8], follow: bool) -> Output {
        let size = script.len().to_string();
        let mut args = vec![
            "start",
            &self.base,
            "--script",
            &self.script,
            "--size",
            &size,
        ];
        if follow {
            args.push("--follow");
        }
        run(&args, script)
    }

    fn follow(&self, offset: u64) -> Output {
        run(
            &["follow", &self.base, "--offset", &offset.to_string()],
            b"",
        )
    }

    fn kill(&self) -> Output {
        run(&["kill", &self.base], b"")
    }

    /// The supervisor's pid, once written.
    fn pid(&self) -> i32 {
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(self.file("pid"))
                && let Ok(pid) = s.trim().parse()
            {
                return pid;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "no pid file");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The launcher under `timeout 30`, `stdin` written then closed.
fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new("timeout")
        .arg("30")
        .arg(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A launcher that stopped reading early may have closed its stdin.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The report line (`EXIT n`, `FAILED ...`, `LOST`), heartbeat dots removed.
fn report(o: &Output) -> String {
    stderr(o)
        .lines()
        .map(|l| l.trim_start_matches('.'))
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

fn which(program: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} not on PATH"))
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(") ").next().unwrap_or("").starts_with('Z'))
}

#[test]
fn start_follow_and_resume_from_an_offset() {
    let s = Stage::new();
    let script = b"echo one; printf 'two\\n'; echo err >&2; exit 42\n";
    let out = s.start(script, true);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "one\ntwo\nerr\n");
    assert_eq!(report(&out), "EXIT 42");
    // A retried start (after a broken stream) neither starts the script again nor loses output.
    let again = s.start(b"echo ran-twice\n", true);
    assert_eq!(stdout(&again), "one\ntwo\nerr\n");
    assert_eq!(report(&again), "EXIT 42");
    let rest = s.follow(4);
    assert_eq!(stdout(&rest), "two\nerr\n");
    assert_eq!(report(&rest), "EXIT 42");
}

/// The script is written as received: every byte value, NUL included.
#[test]
fn scripts_arrive_byte_for_byte() {
    let s = Stage::new();
    let mut script = b"exit 0\n# it's \"$HOME\" \\ `x` $'\\n'\n".to_vec();
    script.extend(0u8..=255);
    let out = s.start(&script, false);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&s.script).unwrap(), script);
    assert_eq!(report(&s.follow(0)), "EXIT 0");
}

/// An upload cut short starts nothing and touches nothing; the exec may simply be retried.
#[test]
fn an_upload_cut_short_starts_nothing() {
    let s = Stage::new();
    let script = b"echo ran > \"$(dirname \"$0\")/ran\"\n";
    let size = (script.len() + 1).to_string();
    let out = run(
        &[
            "start", &s.base, "--script", &s.script, "--size", &size, "--follow",
        ],
        script,
    );
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(!s.exists("started") && !Path::new(&s.script).exists());
    assert!(!s.dir.path().join("ran").exists());
    // The retry with the whole script runs it.
    assert_eq!(report(&s.start(script, true)), "EXIT 0");
    assert!(s.dir.path().join("ran").exists());
}

/// Without the v5 exec protocol stdin never closes: the size ends the upload, not EOF.
#[test]
fn start_ends_without_stdin_closing() {
    let s = Stage::new();
    let script = b"echo hi\n";
    let mut child = Command::new("timeout")
        .arg("30")
        .arg(BIN)
        .args([
            "start", &s.base, "--script", &s.script, "--size", "8", "--follow",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script).unwrap();
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(stdout(&out), "hi\n");
    assert_eq!(report(&out), "EXIT 0");
}

/// A cancel that wins the race against the launch: the kill takes the start guard, the launch
/// that follows starts nothing, and followers see the signal exit.
#[test]
fn a_kill_before_the_launch_means_the_stage_never_starts() {
    let s = Stage::new();
    let t = Instant::now();
    assert!(s.kill().status.success());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "no wait without a launch"
    );
    let out = s.start(b"echo ran > \"$(dirname \"$0\")/ran\"\n", true);
    assert_eq!(report(&out), "EXIT 143", "{out:?}");
    assert!(!s.dir.path().join("ran").exists());
    assert!(!s.exists("pid"));
}

/// A cancel stops the whole tree: a plain child, one ignoring SIGTERM, one in its own session
/// (`setsid`), one orphaned by a double fork. All block in `read` (no `sleep` needed).
#[test]
fn a_kill_stops_the_whole_process_tree() {
    let s = Stage::new();
    let d = s.dir.path().display();
    let script = format!(
        "sh -c 'echo $$ > {d}/a; read x < /dev/ptmx' &\n\
         sh -c 'trap \"\" TERM; echo $$ > {d}/b; read x < /dev/ptmx' &\n\
         setsid sh -c 'echo $$ > {d}/c; read x < /dev/ptmx' &\n\
         ( sh -c 'echo $$ > {d}/d; read x < /dev/ptmx' & )\n\
         echo started\nwait\n"
    );
    assert!(s.start(script.as_bytes(), false).status.success());
    let t = Instant::now();
    let mut pids = Vec::new();
    for n in ["a", "b", "c", "d"] {
        let f = s.dir.path().join(n);
        while !std::fs::read_to_string(&f).is_ok_and(|p| p.ends_with('\n')) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "child {n} never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid: i32 = std::fs::read_to_string(&f).unwrap().trim().parse().unwrap();
        assert!(alive(pid), "{n}");
        pids.push((n, pid));
    }
    let t = Instant::now();
    assert!(s.kill().status.success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Killed processes may stay zombies for a moment until their new parent reaps them.
    std::thread::sleep(Duration::from_millis(200));
    for (n, pid) in pids {
        assert!(!alive(pid), "child {n} ({pid}) survived the kill");
    }
    let out = s.follow(0);
    assert_eq!(stdout(&out), "started\n");
    assert_eq!(report(&out), "EXIT 143");
}

/// The supervisor is killed from outside (the OOM killer, say): the script ends and nobody
/// records its code. Followers say LOST 3 s after it is gone instead of waiting for ever, and
/// still stream the log.
#[test]
fn a_supervisor_killed_from_outside_is_reported_lost() {
    let s = Stage::new();
    assert!(s.start(b"sleep 0.5; echo late\n", false).status.success());
    let pid = s.pid();
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t = Instant::now();
    let out = s.follow(0);
    assert_eq!(report(&out), "LOST", "{out:?}");
    assert_eq!(stdout(&out), "late\n");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(!s.exists("exit"));
}

/// A script running past the 3 s LOST delay, with its supervisor alive, is followed to its end.
#[test]
fn a_live_script_past_the_lost_delay_is_not_lost() {
    let s = Stage::new();
    let out = s.start(b"sleep 3.5; echo done\n", true);
    assert_eq!(stdout(&out), "done\n");
    assert_eq!(report(&out), "EXIT 0");
}

/// No shell to run the script (an image without `sh`): a recorded launch failure, at once.
#[test]
fn no_shell_is_a_launch_failure() {
    let s = Stage::new();
    let size = "8";
    // `timeout` by its path: the PATH given to the launcher has nothing on it.
    let mut child = Command::new(which("timeout"))
        .arg("30")
        .arg(BIN)
        .args([
            "start", &s.base, "--script", &s.script, "--size", size, "--follow",
        ])
        .env("PATH", s.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"echo hi\n").unwrap();
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let r = report(&out);
    assert!(r.starts_with("FAILED cannot start sh"), "{r}");
    assert!(r.contains("the job image needs sh"), "{r}");
}

/// No space left for the stage's files (a full emptyDir): `start` fails at once saying so, and
/// a follower in a later exec reports the stage failed within seconds, not at the job timeout.
/// The full volume is a 64 KiB tmpfs in a private mount namespace (`unshare`).
#[test]
fn no_space_for_the_stage_files_is_a_launch_failure_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let script = "echo hi\n".repeat(20_000);
    let probe = format!(
        "mount -t tmpfs -o size=64k tmpfs {d} || exit 99\n\
         head -c 1000000 /dev/zero > {d}/fill 2>/dev/null\n\
         s=$(date +%s%N)\n\
         {BIN} start {d}/b --script {d}/b.sh --size {size} --follow < {d}.script\n\
         echo \"start-rc=$? ms=$((($(date +%s%N) - s) / 1000000))\"\n\
         s=$(date +%s%N)\n\
         {BIN} follow {d}/b --offset 0\n\
         echo \"follow-ms=$((($(date +%s%N) - s) / 1000000))\"\n",
        size = script.len()
    );
    std::fs::write(format!("{d}.script"), &script).unwrap();
    let out = Command::new("timeout")
        .args(["60", "unshare", "-rm", "sh", "-c", &probe])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(format!("{d}.script"));
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(!o.is_empty() && out.status.code() != Some(99), "{out:?}");
    let start_rc = o
        .split("start-rc=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(start_rc, "70", "{o}\n{e}");
    assert!(
        e.contains("FAILED cannot write the stage script") && e.contains("No space left on device"),
        "{e}"
    );
    let ms = |key: &str| -> u64 {
        o.split(key)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(ms("ms=") < 2000, "{o}");
    // The exit record could not be written either: the follower finds no supervisor.
    assert!(e.contains("FAILED the stage was never started"), "{e}");
    assert!(ms("follow-ms=") < 10_000, "{o}");
}

/// `idle` (the build container's pid 1) ends on SIGTERM.
#[test]
fn idle_ends_on_sigterm() {
    let mut child = Command::new(BIN).arg("idle").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "idle ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `install` (the init container) copies the binary, executable by any user.
#[test]
fn install_copies_itself() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["install", &dir.path().display().to_string()], b"");
    assert!(out.status.success(), "{out:?}");
    let copy = dir.path().join("spotrun-launch");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(BIN).unwrap());
    assert_eq!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let v = Command::new(&copy).arg("--version").output().unwrap();
    assert!(stdout(&v).starts_with("spotrun-launch "), "{v:?}");
}
