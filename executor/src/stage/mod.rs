//! `run <script> <stage>`: start the stage script in the pod through `spotrun-launch` (it runs
//! detached and survives any exec stream), then follow its log from a byte offset, reconnecting
//! after drops, until its exit code is recorded; watch the pod meanwhile.
//!
//! Parts: `launcher` (the in-pod program's command lines and reports), `exec` (one command over
//! the API's exec), `monitor` (pod and node watch), `joblog` (our stdout, shared by the stage and
//! `service_logs`, the `CI_DEBUG_SERVICES` copies); this file ties them into a stage.

mod exec;
mod joblog;
mod launcher;
mod monitor;
mod service_logs;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use rand::Rng as _;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

pub(crate) use exec::{ExecEnd, exec};
use joblog::JobLog;
pub use launcher::{FileHandover, StagePaths};
use launcher::{
    Report, follow_argv, kill_argv, lost_failure, owner_argv, owner_file, report, start_argv,
    start_failure,
};

use crate::Ctx;
use crate::failure::Failure;
use crate::job::JobResponse;
use crate::kubeapi::Kube;
use crate::plan::{BUILD_CONTAINER, HELPER_CONTAINER};
use crate::podstate::{self, PodEnd};
use crate::prepare::{identity, say};
use crate::settings::{HelperFileOwnership, Settings};
use crate::verdict::pod_lost;

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

/// Helper stages that write what the build then uses (the checkout, file variables, restored
/// caches, downloaded artifacts): with `helper_file_ownership = "build-user"` their files are
/// handed to the build container's user. Stages after the build (archive, upload, cleanup) are not.
const HANDOVER_STAGES: [&str; 4] = [
    "get_sources",
    "clear_worktree",
    "restore_cache",
    "download_artifacts",
];

/// What `stage` does about the owner of the files it writes (`[pod] helper_file_ownership`).
/// `project_dir` is the runner's `CI_PROJECT_DIR`.
#[must_use]
pub fn file_handover(settings: &Settings, stage: &str, project_dir: Option<&str>) -> FileHandover {
    if stage_container(stage) != HELPER_CONTAINER {
        return FileHandover::Nothing;
    }
    match settings.pod.helper_file_ownership {
        HelperFileOwnership::Umask => FileHandover::Umask,
        HelperFileOwnership::BuildUser if HANDOVER_STAGES.contains(&stage) => FileHandover::Chown {
            owner_file: owner_file(&settings.dirs.logs_dir),
            trees: handover_trees(&settings.dirs.builds_dir, project_dir),
        },
        HelperFileOwnership::BuildUser => FileHandover::Nothing,
    }
}

/// The project directory and its file variables' `<project>.tmp` (the runner's
/// `TmpProjectDir`), when `CI_PROJECT_DIR` is a plain path below the builds directory; else the
/// builds directory itself. Never a tree outside it: the helper runs as root, and a job must not
/// point it at the scripts or logs volume.
fn handover_trees(builds_dir: &str, project_dir: Option<&str>) -> Vec<String> {
    let builds = builds_dir.trim_end_matches('/');
    let below = project_dir
        .map(|p| p.trim_end_matches('/'))
        .and_then(|p| {
            p.strip_prefix(builds)?
                .strip_prefix('/')
                .map(|rest| (p, rest))
        })
        .filter(|(_, rest)| {
            rest.split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        });
    match below {
        Some((p, _)) => vec![p.to_string(), format!("{p}.tmp")],
        None => vec![if builds.is_empty() { "/" } else { builds }.to_string()],
    }
}

/// Records who the build container runs as (its image's `USER`, or the pod's `runAsUser`) in the
/// logs volume, for the helper stages that hand their files over: one exec per job, once the pod
/// runs (only then is the image's user certain). A failure is one warning line: a root build
/// needs nothing, and a non-root one finds out at its first write.
pub(crate) async fn record_build_owner(ctx: &Ctx, kube: &Kube, pods: &Api<Pod>, name: &str) {
    let file = owner_file(&ctx.settings.dirs.logs_dir);
    let silence = Duration::from_secs(ctx.settings.timeouts.exec_silence_seconds);
    let mut why = String::new();
    for attempt in 1..=3u32 {
        let mut out = Vec::new();
        match exec(
            pods,
            name,
            BUILD_CONTAINER,
            owner_argv(&file),
            None,
            silence,
            &mut |b: &[u8]| out.extend_from_slice(b),
        )
        .await
        {
            ExecEnd::Finished { success: true, .. } => {
                let owner = String::from_utf8_lossy(&out).trim().to_string();
                kube.events.info("build_owner", json!({ "owner": owner }));
                return;
            }
            // The launcher ran and said why (no room for the file, ...): a retry will not help.
            ExecEnd::Finished { stderr, .. } => {
                why = String::from_utf8_lossy(&stderr).trim().to_string();
                break;
            }
            // A dropped stream: worth another attempt.
            ExecEnd::Dropped(w) => why = w,
        }
        tokio::time::sleep(crate::kubeapi::backoff(attempt, 100, 1000, None)).await;
    }
    kube.events
        .warn("build_owner_unknown", json!({ "error": why.clone() }));
    say(&format!(
        "WARNING: could not learn which user the build container runs as ({why}); files the helper writes keep the helper's owner"
    ));
}

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
    // Wall-clock: the service logs of this stage start here (kubelet timestamps are wall-clock).
    let stage_start = Timestamp::now();
    let id = identity(ctx, None)?;
    let name = id.pod_name();
    let container = stage_container(stage);
    ctx.events.set_context("pod", name.clone());
    ctx.events.info(
        "stage_start",
        json!({ "stage": stage, "container": container }),
    );
    let started = Instant::now();
    let result = run_stage(ctx, &name, container, stage, script, stage_start).await;
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

/// The stage, with the service logs copied alongside when the job asks for them.
async fn run_stage(
    ctx: &Ctx,
    name: &str,
    container: &str,
    stage: &str,
    script: Vec<u8>,
    stage_start: Timestamp,
) -> Result<(), Failure> {
    let kube = Kube::connect(&ctx.settings, ctx.events.clone()).await?;
    let service_logs = service_logs::start(ctx, &kube, name, stage, stage_start);
    let result = drive_stage(ctx, &kube, name, container, stage, script).await;
    if let Some(logs) = service_logs {
        logs.finish().await;
    }
    result
}

async fn drive_stage(
    ctx: &Ctx,
    kube: &Kube,
    name: &str,
    container: &str,
    stage: &str,
    script: Vec<u8>,
) -> Result<(), Failure> {
    let settings = &ctx.settings;
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), &kube.namespace);
    let silence = Duration::from_secs(settings.timeouts.exec_silence_seconds);
    let ns = kube.namespace.clone();

    let files = file_handover(settings, stage, ctx.env.get("CI_PROJECT_DIR"));
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
        let start_words = |follow: bool| start_argv(&paths, script.len(), follow, &files);
        if let Some(code) = start_and_follow(
            kube,
            &pods,
            name,
            container,
            start_words(true),
            &script,
            silence,
            &mut offset,
        )
        .await?
        {
            return Ok(code);
        }
        start(
            kube,
            &pods,
            name,
            container,
            start_words(false),
            &script,
            silence,
        )
        .await?;
        follow(kube, &pods, name, container, &paths, silence, offset).await
    });
    let verdict = |r: Result<i32, FollowError>| async {
        match r {
            Err(FollowError::Lost(end)) => {
                Err(pod_lost(ctx, kube, &job_for_record(ctx), end).await)
            }
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
                kill_argv(&paths),
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
    match podstate::pod_end(&pod, &[container]) {
        // The kubelet stops containers before it marks the pod (an eviction, a node shutdown):
        // the pod gets the same grace to say why as after a dropped stream.
        Some(PodEnd::ContainerTerminated { .. }) => {
            match check_pod(kube, &pods, name, container).await {
                Err(FollowError::Lost(end)) => {
                    return Err(pod_lost(ctx, kube, &job_for_record(ctx), end).await);
                }
                Err(FollowError::Failure(f)) => return Err(f),
                Ok(()) => {}
            }
        }
        Some(end) => return Err(pod_lost(ctx, kube, &job_for_record(ctx), end).await),
        None => {}
    }
    if let Some(r) = early {
        return verdict(r).await;
    }

    let (end_tx, mut end_rx) = tokio::sync::mpsc::channel::<PodEnd>(4);
    let monitor = tokio::spawn(monitor::monitor_pod(
        kube.clone(),
        name.to_string(),
        podstate::node_name(&pod),
        container.to_string(),
        end_tx,
    ));
    let result = tokio::select! {
        r = &mut work => verdict(r).await,
        Some(end) = end_rx.recv() => Err(pod_lost(ctx, kube, &job_for_record(ctx), end).await),
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

/// Starts the stage (idempotent: the launcher starts a script at most once) after the one-exec
/// fast path broke. A launch that fails for good (no space for its files, no shell) is a system
/// failure at once; a broken stream is retried.
async fn start(
    kube: &Kube,
    pods: &Api<Pod>,
    name: &str,
    container: &str,
    argv: Vec<String>,
    script: &[u8],
    silence: Duration,
) -> Result<(), FollowError> {
    let mut drops = 0u32;
    loop {
        let why = match exec(
            pods,
            name,
            container,
            argv.clone(),
            Some(script.to_vec()),
            silence,
            &mut |_| {},
        )
        .await
        {
            ExecEnd::Finished { success: true, .. } => return Ok(()),
            ExecEnd::Finished { stderr, .. } => {
                if let Some(Report::Failed(msg)) = report(&stderr) {
                    return Err(start_failure(name, container, &msg).into());
                }
                String::from_utf8_lossy(&stderr).trim().to_string()
            }
            ExecEnd::Dropped(why) => why,
        };
        drops += 1;
        kube.events.warn(
            "exec_reconnect",
            json!({ "phase": "start", "error": why, "attempt": drops }),
        );
        pause_after_drop(kube, pods, name, container, drops, 100, 2000, || {
            format!("could not start the stage in {name}/{container}: {why}")
        })
        .await?;
    }
}

/// After a broken exec: gives up after [`MAX_DROPS_WITHOUT_PROGRESS`] drops in a row (with
/// `give_up`'s message), fails at once when the pod says the stage cannot go on, else waits a
/// backoff of `base_ms` growing to `cap_ms`.
#[allow(
    clippy::too_many_arguments,
    reason = "the stage's context plus the retry policy of one caller"
)]
async fn pause_after_drop(
    kube: &Kube,
    pods: &Api<Pod>,
    name: &str,
    container: &str,
    drops: u32,
    base_ms: u64,
    cap_ms: u64,
    give_up: impl FnOnce() -> String,
) -> Result<(), FollowError> {
    if drops >= MAX_DROPS_WITHOUT_PROGRESS {
        return Err(Failure::System(give_up()).into());
    }
    check_pod(kube, pods, name, container).await?;
    tokio::time::sleep(crate::kubeapi::backoff(drops.min(5), base_ms, cap_ms, None)).await;
    Ok(())
}

/// Writes stage output to the job log as it arrives, counting the bytes.
fn to_stdout(offset: &mut u64) -> impl FnMut(&[u8]) + Send + '_ {
    move |bytes: &[u8]| {
        JobLog::stdout().stage_output(bytes);
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
    argv: Vec<String>,
    script: &[u8],
    silence: Duration,
    offset: &mut u64,
) -> Result<Option<i32>, Failure> {
    let end = exec(
        pods,
        name,
        container,
        argv,
        Some(script.to_vec()),
        silence,
        &mut to_stdout(offset),
    )
    .await;
    let why = match end {
        ExecEnd::Finished { stderr, .. } => match report(&stderr) {
            Some(Report::Exit(code)) => return Ok(Some(code)),
            Some(Report::Lost) => return Err(lost_failure(name, container)),
            Some(Report::Failed(msg)) => return Err(start_failure(name, container, &msg)),
            None => String::from_utf8_lossy(&stderr).trim().to_string(),
        },
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
            follow_argv(paths, before),
            None,
            silence,
            &mut to_stdout(&mut offset),
        )
        .await;
        match end {
            ExecEnd::Finished { stderr, .. } => match report(&stderr) {
                Some(Report::Exit(code)) => return Ok(code),
                Some(Report::Lost) => return Err(lost_failure(name, container).into()),
                Some(Report::Failed(msg)) => {
                    return Err(start_failure(name, container, &msg).into());
                }
                None => {
                    drops += 1;
                    kube.events.warn("exec_reconnect", json!({ "phase": "follow", "error": String::from_utf8_lossy(&stderr).trim(), "offset": offset }));
                }
            },
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
        pause_after_drop(kube, pods, name, container, drops, 50, 1000, || {
            format!("lost the stage output stream of {name}/{container} {drops} times in a row")
        })
        .await?;
    }
}

/// How long a stage runs before its pod is checked (most of the runner's own stages end sooner
/// with exit 0, and then cost the API server nothing but the exec).
const POD_CHECK_AFTER: Duration = Duration::from_millis(50);

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

    /// With `build-user`, the helper stages before the build hand the project directory and its
    /// file variables over (never a tree outside the builds directory); with `umask`, every
    /// helper stage runs with umask 0000; build-container stages do neither.
    #[test]
    fn helper_stages_hand_their_files_to_the_build_user() {
        let mut s = Settings::default();
        let chown = |trees: &[&str]| FileHandover::Chown {
            owner_file: "/spotrun/logs/build-owner".into(),
            trees: trees.iter().map(|t| (*t).to_string()).collect(),
        };
        let project = Some("/builds/acme/app");
        for stage in HANDOVER_STAGES {
            assert_eq!(
                file_handover(&s, stage, project),
                chown(&["/builds/acme/app", "/builds/acme/app.tmp"]),
                "{stage}"
            );
        }
        for stage in [
            "prepare_script",
            "archive_cache",
            "upload_artifacts_on_success",
            "cleanup_file_variables",
            "build_script",
            "after_script",
        ] {
            assert_eq!(
                file_handover(&s, stage, project),
                FileHandover::Nothing,
                "{stage}"
            );
        }
        for odd in [
            None,
            Some("/spotrun/scripts"),
            Some("/builds"),
            Some("/builds/../spotrun/logs"),
            Some("/buildsx/a"),
            Some("/builds//a"),
            Some("/builds/a/./b"),
        ] {
            assert_eq!(
                file_handover(&s, "get_sources", odd),
                chown(&["/builds"]),
                "{odd:?}"
            );
        }
        assert_eq!(
            file_handover(&s, "get_sources", Some("/builds/acme/app/")),
            chown(&["/builds/acme/app", "/builds/acme/app.tmp"])
        );
        s.pod.helper_file_ownership = HelperFileOwnership::Umask;
        for stage in HELPER_STAGES {
            assert_eq!(
                file_handover(&s, stage, project),
                FileHandover::Umask,
                "{stage}"
            );
        }
        assert_eq!(
            file_handover(&s, "build_script", project),
            FileHandover::Nothing
        );
    }

    #[test]
    fn stage_names_with_path_characters_are_refused() {
        for bad in ["../etc", "a/b", "", "x y", "a.b", "stage\n"] {
            assert!(check_stage_name(bad).is_err(), "{bad:?}");
        }
        check_stage_name("step_release-2").unwrap();
    }
}
