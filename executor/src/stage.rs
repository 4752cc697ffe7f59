//! `run <script> <stage>`: copy the script into the pod, start it detached (it survives any exec
//! stream), then follow its log file from a byte offset, reconnecting after drops, until its exit
//! code file appears.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, AttachParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event as WEvent};
use rand::Rng as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::signal::unix::{SignalKind, signal};

use crate::Ctx;
use crate::failure::Failure;
use crate::job::JobResponse;
use crate::kubeapi::Kube;
use crate::plan::{BUILD_CONTAINER, HELPER_CONTAINER};
use crate::podstate::{self, PodEnd};
use crate::prepare::{identity, lost};

/// Stages the Kubernetes executor runs in the helper container (`Predefined` in the runner).
const HELPER_STAGES: [&str; 10] = [
    "prepare_script",
    "get_sources",
    "clear_worktree",
    "restore_cache",
    "download_artifacts",
    "archive_cache",
    "archive_cache_on_failure",
    "upload_artifacts_on_success",
    "upload_artifacts_on_failure",
    "cleanup_file_variables",
];

/// The container a stage runs in: helper for the runner's own stages, build for everything else.
#[must_use]
pub fn stage_container(stage: &str) -> &'static str {
    if HELPER_STAGES.contains(&stage) {
        HELPER_CONTAINER
    } else {
        BUILD_CONTAINER
    }
}

/// Stage names become file names in the pod: only `[A-Za-z0-9_-]`, at most 100 characters.
pub fn check_stage_name(stage: &str) -> Result<(), Failure> {
    let ok = !stage.is_empty()
        && stage.len() <= 100
        && stage
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Failure::Job(format!(
            "stage name {stage:?} is not allowed (only letters, digits, '_' and '-')"
        )))
    }
}

/// Files of one stage run inside the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePaths {
    pub script: String,
    pub log: String,
    pub exit: String,
    pub pid: String,
    pub started: String,
}

impl StagePaths {
    #[must_use]
    pub fn new(scripts_dir: &str, logs_dir: &str, stage: &str, run_id: &str) -> Self {
        let base = format!("{}/{stage}-{run_id}", logs_dir.trim_end_matches('/'));
        Self {
            script: format!("{}/{stage}-{run_id}.sh", scripts_dir.trim_end_matches('/')),
            log: format!("{base}.log"),
            exit: format!("{base}.exit"),
            pid: format!("{base}.pid"),
            started: format!("{base}.started"),
        }
    }
}

/// Single-quotes for sh (paths are validated, but quoting keeps it obviously safe).
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The stage script as a shell word: single quotes keep every byte but `'` (written `'\''`) and
/// NUL, which no shell variable can hold.
fn quoted_script(script: &[u8]) -> Result<Vec<u8>, Failure> {
    if let Some(at) = script.iter().position(|&b| b == 0) {
        return Err(Failure::System(format!(
            "the stage script has a NUL byte at offset {at}; a shell script cannot carry one"
        )));
    }
    let mut out = Vec::with_capacity(script.len() + script.len() / 64 + 8);
    out.push(b'\'');
    for &b in script {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    Ok(out)
}

/// What `sh -s` reads on stdin to start a stage: `X='<script>'`, then `body` as one `{ ...; }`
/// group. A shell runs a command only once it has parsed all of it, so an upload cut anywhere
/// (inside the quotes or the group) is a syntax error that runs nothing; no length check, and no
/// `cat`/`wc` process, is needed.
fn program(script: &[u8], body: &str) -> Result<Vec<u8>, Failure> {
    let mut out = b"X=".to_vec();
    out.extend_from_slice(&quoted_script(script)?);
    out.extend_from_slice(b"\n{\n");
    out.extend_from_slice(body.as_bytes());
    // `exit` in the group: the shell must not wait for the end of stdin, which an exec without
    // the v5 stream protocol (no stdin close) never delivers.
    out.extend_from_slice(b"exit\n}\n");
    Ok(out)
}

/// Starts the script in `$X` once, detached from the exec. The guard is an `O_EXCL` create
/// (`true > file` under `set -C`: a regular builtin, so a failed redirection does not end the
/// shell); only the winner writes the script file, so a retried launch never touches a running
/// script. The script runs under `setsid` (its own session and process group, which the kill
/// script signals; its pid goes to the pid file), and a background subshell of this shell (a
/// fork, no process start) waits for it and writes the exit code with one `write(2)`; readers
/// wait for a non-empty exit file (`-s`). The subshell outlives this shell when the exec ends.
/// Every external command is a process start inside the pod, so the scripts use shell builtins
/// wherever POSIX sh has one. Leaves the subshell's pid in `$W` (empty when this launch did not
/// start the script).
fn launcher_body(p: &StagePaths) -> String {
    format!(
        r#"set -e
S={s}; L={l}; E={e}; P={p}; G={started}; W=
set -C
if true 2>/dev/null > "$G"; then
  set +C
  printf '%s' "$X" > "$S"
  : > "$L"
  if command -v bash >/dev/null 2>&1; then B=bash; else B=sh; fi
  if command -v setsid >/dev/null 2>&1; then D=setsid; else D=nohup; fi
  (
    set +e
    $D $B "$S" > "$L" 2>&1 < /dev/null &
    echo $! > "$P"
    wait $!
    echo $? > "$E"
  ) > /dev/null 2>&1 < /dev/null &
  W=$!
else
  set +C
fi
"#,
        s = q(&p.script),
        l = q(&p.log),
        e = q(&p.exit),
        p = q(&p.pid),
        started = q(&p.started),
    )
}

/// The launcher's stdin for `sh -s`: starts the stage (at most once) and ends.
pub fn launcher_program(p: &StagePaths, script: &[u8]) -> Result<Vec<u8>, Failure> {
    program(script, &launcher_body(p))
}

/// Prints the log from byte `offset` as it grows; ends with `EXIT <code>` on stderr once the exit
/// file has its code (checked before the last read, so no byte is missed). A `.` on stderr every
/// ~2 s is the heartbeat that lets the client tell a silent script from a dead stream.
///
/// Between polls it sleeps in a background `sleep` and `wait`s for it with `SIGCHLD` trapped: when
/// the subshell that waits for the script is a child of this shell (one exec started and follows
/// it), its exit ends the `wait` at once (POSIX: a trapped signal interrupts `wait`), so a stage
/// ends without polling latency and the poll interval only paces streaming. A follower in a
/// later exec is not the subshell's parent: it polls every 10 ms for the first ~200 ms, then
/// every 100 ms. `hb` counts elapsed sleep in 10 ms units.
///
/// Should the script be gone (no such pid, or a zombie nobody reaps) for 3 s with no exit code
/// recorded (the subshell that waits for it was killed from outside), it ends with `LOST` on
/// stderr instead of waiting for the job timeout; `gone` counts that time in 10 ms units.
fn follow_loop(p: &StagePaths, offset: u64) -> String {
    format!(
        r#"L={l}; E={e}; P={p}; off={offset}; hb=0; n=0; t=0.01; dt=1; fast=20; gone=0; pid=
if [ -n "$W" ]; then t=0.1; dt=10; fast=0; fi
trap : CHLD
while :; do
  if [ -s "$E" ]; then
    if [ -s "$L" ]; then tail -c +$((off + 1)) "$L"; fi
    read -r code < "$E"; printf 'EXIT %s\n' "$code" >&2; exit 0
  fi
  if [ -s "$L" ]; then
    size=$(($(wc -c < "$L")))
    if [ "$size" -gt "$off" ]; then
      tail -c +$((off + 1)) "$L" | head -c $((size - off))
      off=$size
    fi
  fi
  if [ -z "$pid" ] && [ -s "$P" ]; then read -r pid < "$P"; fi
  if [ -n "$pid" ]; then
    st=
    read -r _ _ st _ 2>/dev/null < "/proc/$pid/stat"
    if kill -0 "$pid" 2>/dev/null && [ "$st" != Z ]; then gone=0; else gone=$((gone + dt)); fi
    if [ "$gone" -ge 300 ] && [ ! -s "$E" ]; then printf 'LOST\n' >&2; exit 0; fi
  fi
  if [ "$hb" -ge 200 ]; then printf . >&2; hb=0; fi
  n=$((n + 1))
  if [ "$n" -gt "$fast" ]; then t=0.1; dt=10; fi
  hb=$((hb + dt))
  {{ sleep $t 2>/dev/null || sleep 1; }} < /dev/null > /dev/null 2>&1 &
  s=$!
  wait $s || kill $s 2>/dev/null
done
"#,
        l = q(&p.log),
        e = q(&p.exit),
        p = q(&p.pid),
    )
}

/// A follower in its own exec, from byte `offset` of the log.
#[must_use]
pub fn follower_script(p: &StagePaths, offset: u64) -> String {
    format!("W=\n{}", follow_loop(p, offset))
}

/// The launcher and then the follower from offset 0, for one exec per stage (`sh -s` stdin). The
/// follower is the waiting subshell's parent only if this launch started it (`$W` set); a rerun
/// polls like a later exec.
pub fn start_and_follow_program(p: &StagePaths, script: &[u8]) -> Result<Vec<u8>, Failure> {
    program(
        script,
        &format!("{}set +e\n{}", launcher_body(p), follow_loop(p, 0)),
    )
}

/// Stops the stage's process group (TERM, then KILL); harmless if it already ended. It first tries
/// to take the launcher's start guard itself: if it wins, the launch in flight (a SIGTERM that
/// came before the pod's shell got that far) will never start the script, and the exit file says
/// so; if the launcher won, it waits up to 1 s for the pid file the launcher writes next.
#[must_use]
pub fn kill_script(p: &StagePaths) -> String {
    format!(
        r#"P={p}; E={e}; G={started}
set -C
if true 2>/dev/null > "$G"; then echo 143 > "$E"; exit 0; fi
set +C
i=0; while [ ! -s "$P" ] && [ $i -lt 20 ]; do sleep 0.05 2>/dev/null || sleep 1; i=$((i + 1)); done
[ -s "$P" ] || exit 0
read -r pid < "$P"
[ -s "$E" ] && exit 0
kill -TERM -"$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
i=0; while [ $i -lt 10 ] && kill -0 -"$pid" 2>/dev/null; do sleep 0.1 2>/dev/null || sleep 1; i=$((i + 1)); done
kill -KILL -"$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
# The subshell waiting for the script records its signal exit; should it be gone too, do it here.
[ -s "$E" ] || echo 143 > "$E"
"#,
        p = q(&p.pid),
        e = q(&p.exit),
        started = q(&p.started),
    )
}

/// Parses the follower's stderr: the code after the last `EXIT `.
#[must_use]
pub fn parse_exit(stderr: &[u8]) -> Option<i32> {
    let text = String::from_utf8_lossy(stderr);
    let idx = text.rfind("EXIT ")?;
    text[idx + 5..].split_whitespace().next()?.parse().ok()
}

/// Whether the follower gave up on a script that ended without an exit code (`LOST`).
#[must_use]
pub fn lost_exit(stderr: &[u8]) -> bool {
    stderr.windows(5).any(|w| w == b"LOST\n")
}

/// The system failure for a script that ended without recording its exit code.
fn lost_exit_failure(pod: &str, container: &str) -> Failure {
    Failure::System(format!(
        "the stage's script in {pod}/{container} ended without recording an exit code \
         (the process waiting for it was killed from outside the job)"
    ))
}

/// How one exec ended.
#[derive(Debug)]
pub(crate) enum ExecEnd {
    /// The command finished and reported its status (Some(true) = success).
    Finished { success: bool, stderr: Vec<u8> },
    /// The stream broke: no status, silence, or the connection failed.
    Dropped(String),
}

/// `sh -c <script>`.
fn sh_c(script: String) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script]
}

/// `sh -s`: the program comes on stdin (see `program`).
fn sh_s() -> Vec<String> {
    vec!["sh".into(), "-s".into()]
}

/// Runs a command in a container; stdout goes to `sink` as it arrives.
pub(crate) async fn exec(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    silence: Duration,
    sink: &mut (dyn FnMut(&[u8]) + Send),
) -> ExecEnd {
    let ap = AttachParams::default()
        .container(container)
        .stdin(stdin.is_some())
        .stdout(true)
        .stderr(true)
        .max_stdout_buf_size(64 * 1024)
        .max_stderr_buf_size(16 * 1024)
        .max_stdin_buf_size(64 * 1024);
    let connect = tokio::time::timeout(silence, pods.exec(pod, argv, &ap)).await;
    let mut proc = match connect {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return ExecEnd::Dropped(format!("exec connect: {e}")),
        Err(_) => return ExecEnd::Dropped("exec connect timed out".into()),
    };
    let status = proc.take_status();
    let (Some(mut out), Some(mut err)) = (proc.stdout(), proc.stderr()) else {
        return ExecEnd::Dropped("exec streams missing".into());
    };
    let writer = match (stdin, proc.stdin()) {
        (Some(data), Some(mut w)) => Some(tokio::spawn(async move {
            let _ = w.write_all(&data).await;
            let _ = w.shutdown().await;
        })),
        _ => None,
    };
    let mut obuf = vec![0u8; 64 * 1024];
    let mut ebuf = vec![0u8; 8 * 1024];
    let mut stderr = Vec::new();
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        tokio::select! {
            r = out.read(&mut obuf), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => sink(&obuf[..n]),
            },
            r = err.read(&mut ebuf), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => stderr.extend_from_slice(&ebuf[..n]),
            },
            () = tokio::time::sleep(silence) => {
                proc.abort();
                return ExecEnd::Dropped(format!("exec stream silent for {} s", silence.as_secs()));
            }
        }
    }
    if let Some(w) = writer {
        w.abort();
    }
    let Some(status) = status else {
        return ExecEnd::Dropped("exec status channel missing".into());
    };
    match tokio::time::timeout(silence, status).await {
        Ok(Some(s)) => ExecEnd::Finished {
            success: s.status.as_deref() == Some("Success"),
            stderr,
        },
        // No status frame: the stream ended abnormally. Never read this as success.
        Ok(None) => ExecEnd::Dropped("exec stream ended without a status".into()),
        Err(_) => ExecEnd::Dropped("exec status did not arrive".into()),
    }
}

/// The job fields a preemption record needs, from the payload or (if unreadable) the env.
fn job_for_record(ctx: &Ctx) -> JobResponse {
    if let Ok(job) = crate::prepare::load_job() {
        return job;
    }
    let mut job = JobResponse::default();
    let num = |k: &str| ctx.env.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    job.id = num("CI_JOB_ID");
    job.job_info.project_id = num("CI_PROJECT_ID");
    job.job_info.pipeline_id = num("CI_PIPELINE_ID");
    job.job_info.name = ctx.env.get("CI_JOB_NAME").unwrap_or("").to_string();
    job
}

pub async fn run(ctx: &Ctx, script_path: &Path, stage: &str) -> Result<(), Failure> {
    check_stage_name(stage)?;
    let script = std::fs::read(script_path).map_err(|e| {
        Failure::System(format!(
            "reading stage script {}: {e}",
            script_path.display()
        ))
    })?;
    let id = identity(ctx, None)?;
    let name = id.pod_name();
    let container = stage_container(stage);
    ctx.events.set_context("pod", name.clone());
    ctx.events.info(
        "stage_start",
        json!({ "stage": stage, "container": container }),
    );
    let started = Instant::now();
    let result = run_stage(ctx, &name, container, stage, script).await;
    let outcome = match &result {
        Ok(()) => "success".to_string(),
        Err(Failure::Script(n)) => format!("exit {n}"),
        Err(Failure::Preempted(_)) => "preempted".into(),
        Err(Failure::Cancelled(_)) => "cancelled".into(),
        Err(_) => "system_failure".into(),
    };
    ctx.events.info(
        "stage_end",
        json!({ "stage": stage, "container": container, "outcome": outcome,
                "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX) }),
    );
    result
}

async fn run_stage(
    ctx: &Ctx,
    name: &str,
    container: &str,
    stage: &str,
    script: Vec<u8>,
) -> Result<(), Failure> {
    let settings = &ctx.settings;
    let kube = Kube::connect(settings, ctx.events.clone()).await?;
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let silence = Duration::from_secs(settings.timeouts.exec_silence_seconds);
    let ns = kube.namespace.clone();

    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    let paths = StagePaths::new(
        &settings.dirs.scripts_dir,
        &settings.dirs.logs_dir,
        stage,
        &run_id,
    );
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Failure::System(format!("installing SIGTERM handler: {e}")))?;

    let mut work = Box::pin(async {
        // One exec uploads, starts and follows the stage; only if that stream breaks does the
        // stage fall back to the idempotent launcher and a follower resuming at the offset.
        let mut offset = 0u64;
        if let Some(code) = start_and_follow(
            &kube,
            &pods,
            name,
            container,
            &paths,
            &script,
            silence,
            &mut offset,
        )
        .await?
        {
            return Ok(code);
        }
        start(&kube, &pods, name, container, &paths, script, silence).await?;
        follow(&kube, &pods, name, container, &paths, silence, offset).await
    });
    let verdict = |r: Result<i32, FollowError>| async {
        match r {
            Err(FollowError::Lost(end)) => Err(lost(ctx, &kube, &job_for_record(ctx), end).await),
            Err(FollowError::Failure(f)) => Err(f),
            Ok(0) => Ok(()),
            Ok(n) => Err(Failure::Script(n)),
        }
    };
    let cancel = || async {
        ctx.events.info("cancelled", json!({ "during": stage }));
        // Bounded: the runner may SIGKILL us, and cleanup deletes the pod anyway.
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            exec(
                &pods,
                name,
                container,
                sh_c(kill_script(&paths)),
                None,
                Duration::from_secs(3),
                &mut |_| {},
            ),
        )
        .await;
        Err(Failure::Cancelled(format!(
            "stage {stage} cancelled; its processes in the pod were stopped"
        )))
    };

    // A stage that ends with exit 0 within POD_CHECK_AFTER needs no pod check: the pod ran it.
    // Otherwise the check runs while the exec goes on: its verdict on a missing or ended pod wins
    // over whatever the exec saw, and it names the node to watch.
    let mut early: Option<Result<i32, FollowError>> = None;
    tokio::select! {
        r = &mut work => match r {
            Ok(0) => return Ok(()),
            r => early = Some(r),
        },
        () = tokio::time::sleep(POD_CHECK_AFTER) => {}
        _ = term.recv() => return cancel().await,
    }
    let mut get = Box::pin(kube.call("get pod", || pods.get_opt(name)));
    let pod = loop {
        tokio::select! {
            r = &mut get => match (r, early.take()) {
                (Ok(pod), early_end) => { early = early_end; break pod; }
                // The API failed us; a stage that already ended still has its own verdict.
                (Err(_), Some(r)) => return verdict(r).await,
                (Err(e), None) => return Err(e.into()),
            },
            r = &mut work, if early.is_none() => early = Some(r),
            _ = term.recv() => return cancel().await,
        }
    };
    let Some(pod) = pod else {
        return Err(Failure::System(format!(
            "job pod {ns}/{name} does not exist (deleted, or prepare did not run)"
        )));
    };
    if let Some(end) = podstate::pod_end(&pod, &[container]) {
        return Err(lost(ctx, &kube, &job_for_record(ctx), end).await);
    }
    if let Some(r) = early {
        return verdict(r).await;
    }

    let (end_tx, mut end_rx) = tokio::sync::mpsc::channel::<PodEnd>(4);
    let monitor = tokio::spawn(monitor_pod(
        kube.clone(),
        name.to_string(),
        podstate::node_name(&pod),
        container.to_string(),
        end_tx,
    ));
    let result = tokio::select! {
        r = &mut work => verdict(r).await,
        Some(end) = end_rx.recv() => Err(lost(ctx, &kube, &job_for_record(ctx), end).await),
        _ = term.recv() => cancel().await,
    };
    monitor.abort();
    result
}

enum FollowError {
    Lost(PodEnd),
    Failure(Failure),
}

impl From<Failure> for FollowError {
    fn from(f: Failure) -> Self {
        Self::Failure(f)
    }
}

/// After a dropped stream: is the pod still able to run the stage?
async fn check_pod(
    kube: &Kube,
    pods: &Api<Pod>,
    name: &str,
    container: &str,
) -> Result<(), FollowError> {
    let grace_until = Instant::now() + TERMINATION_GRACE;
    loop {
        match kube.call("get pod", || pods.get_opt(name)).await {
            Ok(None) => {
                return Err(FollowError::Lost(PodEnd::Deleted {
                    node: String::new(),
                    spot_hint: None,
                }));
            }
            Ok(Some(pod)) => match podstate::pod_end(&pod, &[container]) {
                // The kubelet stops containers before it marks the pod (node shutdown): give the
                // pod a moment to show whether this is a preemption.
                Some(PodEnd::ContainerTerminated { .. }) if Instant::now() < grace_until => {}
                Some(end) => return Err(FollowError::Lost(end)),
                None => return Ok(()),
            },
            Err(e) => return Err(FollowError::Failure(e.into())),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How long a stopped container may wait for the pod to show a preemption verdict.
const TERMINATION_GRACE: Duration = Duration::from_secs(5);

/// Attempts without progress before a stage gives up on a stream that keeps breaking.
const MAX_DROPS_WITHOUT_PROGRESS: u32 = 12;

async fn start(
    kube: &Kube,
    pods: &Api<Pod>,
    name: &str,
    container: &str,
    paths: &StagePaths,
    script: Vec<u8>,
    silence: Duration,
) -> Result<(), FollowError> {
    let launcher = launcher_program(paths, &script)?;
    let mut drops = 0u32;
    loop {
        match exec(
            pods,
            name,
            container,
            sh_s(),
            Some(launcher.clone()),
            silence,
            &mut |_| {},
        )
        .await
        {
            ExecEnd::Finished { success: true, .. } => return Ok(()),
            ExecEnd::Finished {
                success: false,
                stderr,
            } => {
                let msg = String::from_utf8_lossy(&stderr).trim().to_string();
                drops += 1;
                kube.events.warn(
                    "exec_reconnect",
                    json!({ "phase": "start", "error": msg, "attempt": drops }),
                );
                if drops >= MAX_DROPS_WITHOUT_PROGRESS {
                    return Err(Failure::System(format!(
                        "could not start the stage in container {container}: {msg}"
                    ))
                    .into());
                }
            }
            ExecEnd::Dropped(why) => {
                drops += 1;
                kube.events.warn(
                    "exec_reconnect",
                    json!({ "phase": "start", "error": why, "attempt": drops }),
                );
                if drops >= MAX_DROPS_WITHOUT_PROGRESS {
                    return Err(Failure::System(format!(
                        "exec into {name}/{container} keeps failing: {why}"
                    ))
                    .into());
                }
            }
        }
        check_pod(kube, pods, name, container).await?;
        tokio::time::sleep(crate::kubeapi::backoff(drops.min(5), 100, 2000, None)).await;
    }
}

/// Writes stage output to our stdout as it arrives, counting the bytes.
fn to_stdout(offset: &mut u64) -> impl FnMut(&[u8]) + Send + '_ {
    move |bytes: &[u8]| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
        *offset += bytes.len() as u64;
    }
}

/// The fast path: one exec that uploads the script, starts it detached and follows its log.
/// Returns the exit code, or `None` when the stream broke (the output so far is counted in
/// `offset`; the caller resumes with the launcher, which will not start the script twice).
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the stage's whole context"
)]
async fn start_and_follow(
    kube: &Kube,
    pods: &Api<Pod>,
    name: &str,
    container: &str,
    paths: &StagePaths,
    script: &[u8],
    silence: Duration,
    offset: &mut u64,
) -> Result<Option<i32>, Failure> {
    let program = start_and_follow_program(paths, script)?;
    let end = exec(
        pods,
        name,
        container,
        sh_s(),
        Some(program),
        silence,
        &mut to_stdout(offset),
    )
    .await;
    let why = match end {
        ExecEnd::Finished {
            success: true,
            stderr,
        } => match parse_exit(&stderr) {
            Some(code) => return Ok(Some(code)),
            None if lost_exit(&stderr) => return Err(lost_exit_failure(name, container)),
            None => "no exit code".to_string(),
        },
        ExecEnd::Finished { stderr, .. } => String::from_utf8_lossy(&stderr).trim().to_string(),
        ExecEnd::Dropped(why) => why,
    };
    kube.events.warn(
        "exec_reconnect",
        json!({ "phase": "start+follow", "error": why, "offset": *offset }),
    );
    Ok(None)
}

/// Streams the log to stdout from `offset`; returns the script's exit code.
async fn follow(
    kube: &Kube,
    pods: &Api<Pod>,
    name: &str,
    container: &str,
    paths: &StagePaths,
    silence: Duration,
    mut offset: u64,
) -> Result<i32, FollowError> {
    let mut drops = 0u32;
    loop {
        let before = offset;
        let end = exec(
            pods,
            name,
            container,
            sh_c(follower_script(paths, before)),
            None,
            silence,
            &mut to_stdout(&mut offset),
        )
        .await;
        match end {
            ExecEnd::Finished {
                success: true,
                stderr,
            } => {
                if let Some(code) = parse_exit(&stderr) {
                    return Ok(code);
                }
                if lost_exit(&stderr) {
                    return Err(lost_exit_failure(name, container).into());
                }
                drops += 1;
                kube.events.warn(
                    "exec_reconnect",
                    json!({ "phase": "follow", "error": "no exit code", "offset": offset }),
                );
            }
            ExecEnd::Finished {
                success: false,
                stderr,
            } => {
                drops += 1;
                kube.events.warn("exec_reconnect", json!({ "phase": "follow", "error": String::from_utf8_lossy(&stderr).trim(), "offset": offset }));
            }
            ExecEnd::Dropped(why) => {
                if offset > before {
                    drops = 0;
                }
                drops += 1;
                kube.events.warn(
                    "exec_reconnect",
                    json!({ "phase": "follow", "error": why, "offset": offset, "attempt": drops }),
                );
            }
        }
        if drops >= MAX_DROPS_WITHOUT_PROGRESS {
            return Err(Failure::System(format!(
                "lost the stage output stream of {name}/{container} {drops} times in a row"
            ))
            .into());
        }
        check_pod(kube, pods, name, container).await?;
        tokio::time::sleep(crate::kubeapi::backoff(drops.min(5), 50, 1000, None)).await;
    }
}

/// How long a stage runs before its pod is checked (most of the runner's own stages end sooner
/// with exit 0, and then cost the API server nothing but the exec).
const POD_CHECK_AFTER: Duration = Duration::from_millis(50);

/// How long a stage runs before its pod and node are watched. Short stages (most of the runner's
/// own) then cost the API server no list and watch pair each; a pod that ends earlier breaks
/// the exec stream, which checks the pod anyway, and the watch's initial list catches the rest.
const MONITOR_AFTER: Duration = Duration::from_millis(250);

/// Watches the pod (and its node) while a stage runs; reports the first sign of its end.
async fn monitor_pod(
    kube: Kube,
    name: String,
    node: String,
    container: String,
    tx: tokio::sync::mpsc::Sender<PodEnd>,
) {
    tokio::time::sleep(MONITOR_AFTER).await;
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut pod_stream = watcher::watcher(pods, cfg).default_backoff().boxed();
    let nodes: Api<Node> = Api::all(kube.client.clone());
    let ncfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut node_stream = watcher::watcher(nodes, ncfg).default_backoff().boxed();
    let mut node_ok = !node.is_empty();
    let mut node_errors = 0u32;
    let mut node_seen = false;
    let containers = [container.as_str()];
    // A stopped container is reported only if no stronger verdict follows within the grace.
    let mut pending: Option<(PodEnd, tokio::time::Instant)> = None;
    loop {
        let pending_at = pending.as_ref().map(|(_, t)| *t);
        let end = tokio::select! {
            () = async { if let Some(t) = pending_at { tokio::time::sleep_until(t).await } }, if pending_at.is_some() => pending.take().map(|(e, _)| e),
            item = pod_stream.next() => match item {
                Some(Ok(WEvent::Apply(p) | WEvent::InitApply(p))) => podstate::pod_end(&p, &containers),
                Some(Ok(WEvent::Delete(p))) => Some(podstate::deleted_pod_end(&p)),
                Some(Ok(_)) => None,
                Some(Err(e)) => {
                    kube.events.warn("watch_error", json!({ "resource": "pod", "error": e.to_string() }));
                    None
                }
                None => return,
            },
            item = node_stream.next(), if node_ok => match item {
                Some(Ok(WEvent::InitApply(_) | WEvent::Apply(_))) => { node_seen = true; node_errors = 0; None }
                Some(Ok(WEvent::Delete(_))) => Some(PodEnd::NodeLost { node: node.clone(), reason: "its node was deleted".into(), spot_hint: None }),
                // A relist without the node: it is gone.
                Some(Ok(WEvent::InitDone)) if !node_seen => Some(PodEnd::NodeLost { node: node.clone(), reason: "its node no longer exists".into(), spot_hint: None }),
                Some(Ok(WEvent::InitDone | WEvent::Init)) => { node_seen = false; None }
                Some(Err(e)) => {
                    node_errors += 1;
                    // Without RBAC on nodes the pod watch still catches preemption.
                    if node_errors > 3 { node_ok = false; }
                    kube.events.warn("watch_error", json!({ "resource": "node", "error": e.to_string() }));
                    None
                }
                None => { node_ok = false; None }
            },
        };
        match end {
            Some(end @ PodEnd::ContainerTerminated { .. })
                if pending.is_none() && pending_at.is_none() =>
            {
                pending = Some((end, tokio::time::Instant::now() + TERMINATION_GRACE));
            }
            Some(PodEnd::ContainerTerminated { .. }) | None => {}
            Some(end) => {
                let _ = tx.send(end).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_route_to_containers() {
        for s in HELPER_STAGES {
            assert_eq!(stage_container(s), "helper", "{s}");
        }
        for s in [
            "build_script",
            "step_release",
            "after_script",
            "something_new",
        ] {
            assert_eq!(stage_container(s), "build", "{s}");
        }
    }

    #[test]
    fn stage_names_with_path_characters_are_refused() {
        for bad in ["../etc", "a/b", "", "x y", "a.b", "stage\n"] {
            assert!(check_stage_name(bad).is_err(), "{bad:?}");
        }
        check_stage_name("step_release-2").unwrap();
    }

    #[test]
    fn exit_parsing() {
        assert_eq!(parse_exit(b"..EXIT 42\n"), Some(42));
        assert_eq!(parse_exit(b"EXIT 0\n"), Some(0));
        assert_eq!(parse_exit(b"...."), None);
        assert_eq!(parse_exit(b"EXIT \n"), None);
    }

    fn run_sh(args: &[&str], stdin: &[u8]) -> std::process::Output {
        use std::io::Write as _;
        let mut child = std::process::Command::new("sh")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A shell that stops reading early (syntax error) may close its stdin first.
        let _ = child.stdin.take().unwrap().write_all(stdin);
        child.wait_with_output().unwrap()
    }

    fn sh(script: &str, stdin: &[u8]) -> std::process::Output {
        run_sh(&["-c", script], stdin)
    }

    /// A temp dir holding both the scripts and the logs of one `build_script` run `id`.
    fn stage_in_temp_dir(id: &str) -> (tempfile::TempDir, StagePaths) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let p = StagePaths::new(&d, &d, "build_script", id);
        (dir, p)
    }

    /// `sh -s` with the program on stdin, as the exec runs it.
    fn sh_stdin(program: &[u8]) -> std::process::Output {
        run_sh(&["-s"], program)
    }

    /// The in-pod scripts, run by the local sh: start detached, follow from offsets, exit code.
    #[test]
    fn launcher_and_follower_round_trip_with_resume() {
        let (_dir, p) = stage_in_temp_dir("abcd1234");
        let script = b"echo one; printf 'two\\n'; echo err >&2; exit 42\n";
        let out = sh_stdin(&launcher_program(&p, script).unwrap());
        assert!(out.status.success(), "{out:?}");
        // Second launch (a retried start) must not start it again.
        let out = sh_stdin(&launcher_program(&p, script).unwrap());
        assert!(out.status.success());
        let full = sh(&follower_script(&p, 0), b"");
        assert_eq!(String::from_utf8_lossy(&full.stdout), "one\ntwo\nerr\n");
        assert_eq!(parse_exit(&full.stderr), Some(42));
        // Resuming from an offset yields exactly the rest.
        let rest = sh(&follower_script(&p, 4), b"");
        assert_eq!(String::from_utf8_lossy(&rest.stdout), "two\nerr\n");
    }

    /// The script travels as one single-quoted word: quotes, backslashes, `$`, newlines, control
    /// and non-UTF-8 bytes arrive unchanged; a NUL byte is refused with its offset.
    #[test]
    fn scripts_arrive_byte_for_byte() {
        let (_dir, p) = stage_in_temp_dir("b7e5");
        let mut script = b"#!/bin/sh\n# it's \"$HOME\" \\ `x` $'\\n' '' '\n: '\\''\n".to_vec();
        script.extend((1u8..=255).filter(|&b| b != b'\''));
        script.extend_from_slice(b"\nexit 0\n");
        let out = sh_stdin(&launcher_program(&p, &script).unwrap());
        assert!(out.status.success(), "{out:?}");
        assert_eq!(std::fs::read(&p.script).unwrap(), script);
        let err = launcher_program(&p, b"echo a\0b").unwrap_err();
        assert!(err.to_string().contains("NUL byte at offset 6"), "{err}");
    }

    /// One exec: upload, start, follow to the exit code; a rerun (after a broken stream) neither
    /// starts the script again nor loses output.
    #[test]
    fn start_and_follow_in_one_exec() {
        let (dir, p) = stage_in_temp_dir("5eed0001");
        let script = b"echo ran >> \"$(dirname \"$0\")/count\"; echo out; echo err >&2; exit 3\n";
        let program = start_and_follow_program(&p, script).unwrap();
        let out = sh_stdin(&program);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\nerr\n");
        assert_eq!(parse_exit(&out.stderr), Some(3));
        let again = sh_stdin(&program);
        assert_eq!(String::from_utf8_lossy(&again.stdout), "out\nerr\n");
        assert_eq!(parse_exit(&again.stderr), Some(3));
        let count = std::fs::read_to_string(dir.path().join("count")).unwrap();
        assert_eq!(count, "ran\n", "the script ran exactly once");
    }

    /// Without the v5 exec protocol stdin never closes: the programs must end on their own.
    #[test]
    fn programs_end_without_stdin_closing() {
        use std::io::Write as _;
        let (_dir, p) = stage_in_temp_dir("0pen");
        for program in [
            launcher_program(&p, b"echo hi\n").unwrap(),
            start_and_follow_program(&p, b"echo hi\n").unwrap(),
        ] {
            let mut child = std::process::Command::new("sh")
                .arg("-s")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(&program).unwrap();
            let t = Instant::now();
            let status = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break Some(st);
                }
                if t.elapsed() > Duration::from_secs(10) {
                    child.kill().unwrap();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            drop(stdin);
            assert!(status.is_some_and(|s| s.success()), "{status:?}");
        }
    }

    /// An upload cut at any byte runs nothing: no guard file, no script, no output, no exit code.
    /// Only the whole program (at most without its final newline) starts the stage.
    #[test]
    fn an_upload_cut_anywhere_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let script = b"echo ran >> \"$(dirname \"$0\")/count\"; echo 'it''s'\n";
        let probe =
            start_and_follow_program(&StagePaths::new(&d, &d, "build_script", "cut00000"), script)
                .unwrap();
        let whole = probe.len();
        // Every cut inside the quoted script and the group's first and last lines, and a sample
        // of the rest (each cut is a shell start).
        let cuts: Vec<usize> = (0..whole)
            .filter(|&k| k < script.len() + 16 || k + 64 > whole || k % 37 == 0)
            .collect();
        for k in cuts {
            let p = StagePaths::new(&d, &d, "build_script", &format!("cut{k:05}"));
            let program = start_and_follow_program(&p, script).unwrap();
            assert_eq!(program.len(), whole, "same paths length");
            let out = sh_stdin(&program[..k]);
            let started = Path::new(&p.started).exists();
            if k + 1 >= whole {
                assert!(
                    started && parse_exit(&out.stderr) == Some(0),
                    "cut {k}: {out:?}"
                );
                continue;
            }
            assert!(
                !started,
                "cut at byte {k} of {whole} started the stage: {out:?}"
            );
            assert!(!Path::new(&p.script).exists(), "cut {k}");
            assert_eq!(parse_exit(&out.stderr), None, "cut {k}");
            assert!(out.stdout.is_empty(), "cut {k}: {out:?}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("count")).unwrap(),
            "ran\n",
            "only the whole program ran the script"
        );
    }

    /// A SIGTERM that wins the race against the launch: the kill takes the start guard, the
    /// launch that follows starts nothing, and readers see the signal exit.
    #[test]
    fn kill_before_the_launch_means_the_stage_never_starts() {
        let (dir, p) = stage_in_temp_dir("k0");
        let t = Instant::now();
        assert!(sh(&kill_script(&p), b"").status.success());
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "no wait without a launch"
        );
        let script = b"echo ran > \"$(dirname \"$0\")/ran\"\n";
        let out = sh_stdin(&launcher_program(&p, script).unwrap());
        assert!(out.status.success(), "{out:?}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !dir.path().join("ran").exists(),
            "the script must not start"
        );
        assert!(!Path::new(&p.pid).exists());
        let out = sh(&follower_script(&p, 0), b"");
        assert_eq!(parse_exit(&out.stderr), Some(143));
    }

    #[test]
    fn kill_script_stops_the_stage() {
        let (_dir, p) = stage_in_temp_dir("k1");
        let script = b"sleep 30; echo never\n";
        assert!(
            sh_stdin(&launcher_program(&p, script).unwrap())
                .status
                .success()
        );
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        assert!(sh(&kill_script(&p), b"").status.success());
        let out = sh(&follower_script(&p, 0), b"");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "");
        assert!(parse_exit(&out.stderr).is_some_and(|c| c != 0));
    }

    /// A follower bounded by `timeout` (a broken loop fails the test instead of hanging it).
    fn follow_bounded(p: &StagePaths) -> std::process::Output {
        std::process::Command::new("timeout")
            .args(["30", "sh", "-c", &follower_script(p, 0)])
            .output()
            .unwrap()
    }

    /// The pid in a stage's pid file, once the launch has written it.
    fn stage_pid(p: &StagePaths) -> u32 {
        for _ in 0..200 {
            if let Ok(s) = std::fs::read_to_string(&p.pid)
                && let Ok(pid) = s.trim().parse()
            {
                return pid;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no pid file at {}", p.pid);
    }

    /// The subshell that waits for the script is killed from outside; the script ends and nobody
    /// records its exit code. The follower says `LOST` (3 s after the script is gone) instead of
    /// waiting for the job timeout, and the executor turns that into a system failure.
    #[test]
    fn a_script_whose_waiter_was_killed_is_reported_lost() {
        let (_dir, p) = stage_in_temp_dir("l1");
        let out = sh_stdin(&launcher_program(&p, b"sleep 0.5; echo late\n").unwrap());
        assert!(out.status.success(), "{out:?}");
        let pid = stage_pid(&p);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let waiter = stat.rsplit(") ").next().unwrap().split(' ').nth(1).unwrap();
        let killed = std::process::Command::new("kill")
            .args(["-KILL", waiter])
            .status()
            .unwrap();
        assert!(killed.success());
        let out = follow_bounded(&p);
        assert!(out.status.success(), "{out:?}");
        assert!(lost_exit(&out.stderr), "{out:?}");
        assert_eq!(parse_exit(&out.stderr), None);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "late\n",
            "the log is still streamed"
        );
        assert!(!Path::new(&p.exit).exists());
        let f = lost_exit_failure("ci-jobs/p", "build");
        assert!(
            f.to_string().contains("without recording an exit code"),
            "{f}"
        );
    }

    /// A zombie nobody reaps (a container whose pid 1 does not reap orphans) counts as gone.
    #[test]
    fn an_unreaped_script_counts_as_gone() {
        let (_dir, p) = stage_in_temp_dir("l2");
        // A child of this test process that is never waited for: a zombie while the test runs.
        let zombie = std::process::Command::new("true").spawn().unwrap();
        std::fs::write(&p.started, "").unwrap();
        std::fs::write(&p.log, "").unwrap();
        std::fs::write(&p.pid, format!("{}\n", zombie.id())).unwrap();
        let out = follow_bounded(&p);
        assert!(lost_exit(&out.stderr), "{out:?}");
        drop(zombie);
    }

    /// A script that runs longer than the 3 s `LOST` delay, with its waiter alive, is followed to
    /// its exit code as usual.
    #[test]
    fn a_live_script_past_the_lost_delay_is_not_lost() {
        let (_dir, p) = stage_in_temp_dir("l3");
        let out = sh_stdin(&launcher_program(&p, b"sleep 3.5; echo done\n").unwrap());
        assert!(out.status.success(), "{out:?}");
        let out = follow_bounded(&p);
        assert!(!lost_exit(&out.stderr), "{out:?}");
        assert_eq!(parse_exit(&out.stderr), Some(0));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    }
}
