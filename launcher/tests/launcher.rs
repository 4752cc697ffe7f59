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
        self.start_with(script, follow, &[])
    }

    /// `start` with extra flags (the ownership options).
    fn start_with(&self, script: &[u8], follow: bool, extra: &[&str]) -> Output {
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
        args.extend_from_slice(extra);
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
    run_as(None, BIN, args, stdin)
}

/// `bin` under `timeout 30`, as `uid:gid` (through `setpriv`, no supplementary groups) if given.
fn run_as(user: Option<(u32, u32)>, bin: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("30");
    if let Some((uid, gid)) = user {
        cmd.arg("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups");
    }
    let mut child = cmd
        .arg(bin)
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

/// `(uid, gid)` of `p` itself (a symlink is not followed).
fn owner_of(p: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid())
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A copy of the launcher (through `install`) in a directory every user can enter: the test
/// binary's own directory may not be.
fn launcher_for_everyone(dir: &Path) -> String {
    chmod(dir, 0o755);
    let out = run(&["install", &dir.display().to_string()], b"");
    assert!(out.status.success(), "{out:?}");
    dir.join("spotrun-launch").display().to_string()
}

/// Who the tests run as (root on the test machines: the handover tests need it).
fn me() -> (u32, u32) {
    let id = |flag: &str| {
        let o = Command::new("id").arg(flag).output().unwrap();
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    (id("-u"), id("-g"))
}

/// A tmpfs mounted for the test's length (another filesystem inside a tree).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a tmpfs needs root (the test machines run as root)"
        );
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `owner` (exec'd in the build container) records the uid and gid it runs as.
#[test]
fn owner_records_who_runs_it() {
    let bins = tempfile::tempdir().unwrap();
    let bin = launcher_for_everyone(bins.path());
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o777);
    let file = dir.path().join("build-owner");
    let f = file.display().to_string();
    let out = run_as(Some((1000, 1001)), &bin, &["owner", &f], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "1000:1001\n");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "1000:1001\n");
    let (uid, gid) = me();
    let out = run(&["owner", &f], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        format!("{uid}:{gid}\n")
    );
}

/// After a helper stage the files it wrote in the handed-over tree, the tree itself and the
/// symlinks in it (not their targets) belong to the recorded build user; nothing outside the
/// tree changes, neither a symlink's target nor a filesystem mounted inside it.
#[test]
fn a_helper_stage_hands_its_tree_over_without_following_symlinks_or_crossing_mounts() {
    let (uid, gid) = me();
    assert_eq!((uid, gid), (0, 0), "the handover tests need root");
    let s = Stage::new();
    let root = tempfile::tempdir().unwrap();
    let builds = root.path().join("builds");
    let tree = builds.join("project");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(tree.join("checked-out.txt"), "v1\n").unwrap();
    std::fs::write(outside.join("secret.txt"), "keep\n").unwrap();
    std::fs::write(builds.join("sibling.txt"), "not in the tree\n").unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), tree.join("link-to-secret")).unwrap();
    std::os::unix::fs::symlink("../../../outside", tree.join("sub/link-to-outside")).unwrap();
    let mnt = tree.join("mnt");
    let _tmpfs = Tmpfs::mount(&mnt);
    std::fs::write(mnt.join("inner.txt"), "other fs\n").unwrap();
    let owner = root.path().join("build-owner");
    std::fs::write(&owner, "1000:1000\n").unwrap();

    let t = tree.display().to_string();
    let script = format!(
        "echo written > {t}/new.txt; mkdir -p {t}/sub/deeper; touch {t}/sub/deeper/f; echo stage-done\n"
    );
    let out = s.start_with(
        script.as_bytes(),
        true,
        &[
            "--owner-file",
            &owner.display().to_string(),
            "--chown-tree",
            &t,
            // Not there (no file variables yet): nothing to do, no warning.
            "--chown-tree",
            &format!("{t}.tmp"),
        ],
    );
    assert_eq!(report(&out), "EXIT 0", "{out:?}");
    assert_eq!(stdout(&out), "stage-done\n", "no warning expected");
    for p in [
        "",
        "checked-out.txt",
        "new.txt",
        "sub",
        "sub/deeper",
        "sub/deeper/f",
        "link-to-secret",
        "sub/link-to-outside",
    ] {
        assert_eq!(owner_of(&tree.join(p)), (1000, 1000), "{p:?}");
    }
    for p in [
        outside.clone(),
        outside.join("secret.txt"),
        builds.clone(),
        builds.join("sibling.txt"),
        mnt.clone(),
        mnt.join("inner.txt"),
    ] {
        assert_eq!(owner_of(&p), (0, 0), "{} changed", p.display());
    }
}

/// A checkout that an earlier job handed to the build user (a builds directory that outlives the
/// pod) is owned by uid 1000; the next job's helper runs git in it as root. Git refuses such a
/// repository ("dubious ownership") unless the stage marks it safe, which a handing-over stage
/// does for its own trees; a stage without the handover (the control) keeps git's refusal.
#[test]
fn a_handing_over_stage_may_run_git_in_a_checkout_the_build_user_owns() {
    assert_eq!(me(), (0, 0), "the handover tests need root");
    let root = tempfile::tempdir().unwrap();
    let tree = root.path().join("builds/project");
    std::fs::create_dir_all(&tree).unwrap();
    let git = |args: &[&str]| {
        let o = Command::new("git")
            .args(["-c", "init.defaultBranch=main", "-C"])
            .arg(&tree)
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {o:?}");
    };
    git(&["init", "-q"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "c",
    ]);
    let status = Command::new("chown")
        .args(["-R", "1000:1000"])
        .arg(&tree)
        .status()
        .unwrap();
    assert!(status.success());
    let owner = root.path().join("build-owner");
    std::fs::write(&owner, "1000:1000\n").unwrap();
    let t = tree.display().to_string();
    // Only this stage's environment may make the repository safe.
    let script = format!(
        "export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1\n\
         git -C {t} rev-parse --is-inside-work-tree 2>&1 && echo git-ok\n"
    );

    let control = Stage::new();
    let out = control.start(script.as_bytes(), true);
    assert_eq!(report(&out), "EXIT 128", "{out:?}");
    assert!(stdout(&out).contains("dubious ownership"), "{out:?}");

    let s = Stage::new();
    let out = s.start_with(
        script.as_bytes(),
        true,
        &[
            "--owner-file",
            &owner.display().to_string(),
            "--chown-tree",
            &t,
        ],
    );
    assert_eq!(report(&out), "EXIT 0", "{out:?}");
    assert_eq!(stdout(&out), "true\ngit-ok\n");
}

/// A helper that may not change owners (not root) gets one warning line in its log; the stage
/// keeps its own exit code. An owner file that is missing is one warning line too.
#[test]
fn a_handover_that_is_not_permitted_is_one_warning_line_not_a_failure() {
    let bins = tempfile::tempdir().unwrap();
    let bin = launcher_for_everyone(bins.path());
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o777);
    let base = dir.path().join("get_sources-0a1b").display().to_string();
    let script_path = dir.path().join("get_sources-0a1b.sh").display().to_string();
    let tree = dir.path().join("project");
    let owner = dir.path().join("build-owner");
    std::fs::write(&owner, "2000:2000\n").unwrap();
    let t = tree.display().to_string();
    let script = format!("mkdir -p {t}/a; echo x > {t}/a/f; exit 3\n");
    let size = script.len().to_string();
    let o = owner.display().to_string();
    let args = [
        "start",
        &base,
        "--script",
        &script_path,
        "--size",
        &size,
        "--follow",
        "--owner-file",
        &o,
        "--chown-tree",
        &t,
    ];
    let out = run_as(Some((1000, 1000)), &bin, &args, script.as_bytes());
    assert_eq!(report(&out), "EXIT 3", "{out:?}");
    let log = stdout(&out);
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("WARNING: spotrun-launch:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("3 entries")
            && warnings[0].contains("2000:2000")
            && warnings[0].contains("Operation not permitted"),
        "{log}"
    );
    assert_eq!(owner_of(&tree.join("a/f")), (1000, 1000));

    let s = Stage::new();
    let out = s.start_with(
        b"echo ok\n",
        true,
        &[
            "--owner-file",
            &dir.path().join("missing").display().to_string(),
            "--chown-tree",
            &t,
        ],
    );
    assert_eq!(report(&out), "EXIT 0", "{out:?}");
    let log = stdout(&out);
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(
        log.lines()
            .nth(1)
            .is_some_and(|l| l.contains("the build container's user is not known")),
        "{log}"
    );
}

/// `--umask` is the script's umask: 0000 makes what a helper stage writes world-writable (the
/// Kubernetes executor's fallback); another value shows the flag, not the caller, decides.
#[test]
fn the_umask_flag_is_the_scripts_umask() {
    for (umask, file, dir) in [("0000", 0o666, 0o777), ("0077", 0o600, 0o700)] {
        let s = Stage::new();
        let d = s.dir.path().display().to_string();
        let script = format!("umask; touch {d}/f; mkdir {d}/sub\n");
        let out = s.start_with(script.as_bytes(), true, &["--umask", umask]);
        assert_eq!(report(&out), "EXIT 0", "{out:?}");
        assert_eq!(stdout(&out).trim(), umask, "{out:?}");
        assert_eq!(mode_of(&s.dir.path().join("f")), file, "{umask}");
        assert_eq!(mode_of(&s.dir.path().join("sub")), dir, "{umask}");
    }
    let s = Stage::new();
    let out = s.start_with(b"true\n", false, &["--umask", "999"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(!s.exists("started"), "a bad flag starts nothing");
}
