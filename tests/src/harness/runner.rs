//! Drives a custom executor exactly as gitlab-runner 19.x does (`executors/custom`, `common/build.go`):
//! per-job TMPDIR as working directory, `response.json`, the fixed and `CUSTOM_ENV_*` environment,
//! config → prepare (3 tries, cleanup after each failure) → stages in the runner's order with its
//! skipping rules → cleanup, the exit-code rules, and SIGTERM-to-the-group then SIGKILL on cancel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::process::Command;

use super::job::JobSpec;
use super::script::{self, ScriptWriter};

/// How the job ended, as the runner would report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    Success,
    /// `ERROR: Job failed: exit status N` (the code read from `BUILD_EXIT_CODE_FILE`).
    BuildFailure {
        exit_code: i32,
    },
    /// `ERROR: Job failed (system failure): ...`.
    SystemFailure {
        reason: String,
    },
    Canceled,
    TimedOut,
}

/// One call of an executor program.
#[derive(Debug, Clone)]
pub struct StageRecord {
    /// `config`, `prepare`, `cleanup`, or the run stage name.
    pub stage: String,
    /// Exit code; `None` when killed by a signal.
    pub exit_code: Option<i32>,
    pub duration: Duration,
    /// When the program exited, before its output was drained (for benchmarks).
    pub ended_at: Instant,
    /// Time from our SIGTERM to the process exit, when the stage was cancelled.
    pub exit_after_sigterm: Option<Duration>,
    /// Whether SIGKILL was needed.
    pub killed: bool,
}

/// Everything a job run produced.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// The job log as GitLab would show it (masked values replaced by `[MASKED]`).
    pub log: String,
    /// Output that goes to the runner's own log, never the job log (cleanup's stdout and stderr).
    pub runner_log: String,
    /// Every byte the executor printed anywhere, unmasked (for secret-leak checks).
    pub raw_output: String,
    pub result: JobResult,
    pub stages: Vec<StageRecord>,
}

impl JobOutcome {
    /// The record of a stage, if it ran.
    #[must_use]
    pub fn stage(&self, name: &str) -> Option<&StageRecord> {
        self.stages.iter().find(|s| s.stage == name)
    }

    /// Names of the calls made, in order.
    #[must_use]
    pub fn stage_names(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.stage.as_str()).collect()
    }
}

/// When and how to stop a job from outside.
#[derive(Debug, Clone)]
pub struct Cancel {
    /// Stage (or `prepare`) during which to act.
    pub stage: String,
    /// Delay after that stage's exec started.
    pub after: Duration,
    pub mode: CancelMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelMode {
    /// UI cancel: the user-script stage gets SIGTERM, then `after_script`, `*_on_failure` stages and
    /// cleanup still run.
    Cancel,
    /// Abort or timeout: the running exec gets SIGTERM, every later stage is skipped, cleanup runs.
    Abort,
    /// The runner process dies (SIGKILL to the exec group); nothing else runs, not even cleanup.
    RunnerCrash,
}

/// Presigning for `[runners.cache]`: given (method, object name) returns a URL and the headers the
/// runner would hand to `cache-archiver` for a PUT.
pub type CachePresigner = Arc<dyn Fn(&str, &str) -> (String, Vec<(String, String)>) + Send + Sync>;

/// The gitlab-runner stand-in.
#[derive(Clone)]
pub struct Runner {
    executor: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    builds_dir: Option<String>,
    cache_dir: Option<String>,
    graceful_kill_timeout: Duration,
    force_kill_timeout: Duration,
    prepare_retry_delay: Duration,
    echo: bool,
    cache: Option<CachePresigner>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigOutput {
    builds_dir: Option<String>,
    cache_dir: Option<String>,
    hostname: Option<String>,
    driver: Option<Driver>,
    #[serde(default)]
    job_env: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct Driver {
    name: Option<String>,
    version: Option<String>,
}

struct JobRun<'a> {
    runner: &'a Runner,
    job: &'a JobSpec,
    tmpdir: PathBuf,
    log: Arc<Mutex<Vec<u8>>>,
    runner_log: Vec<u8>,
    raw: Vec<u8>,
    stages: Vec<StageRecord>,
    job_env: BTreeMap<String, String>,
    builds_dir: String,
    hostname: Option<String>,
    cancel: Option<Cancel>,
    cancelled: Option<CancelMode>,
    deadline: Instant,
}

/// The outcome of one exec, classified per `command.go` `waitForCommand`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ExecResult {
    Ok,
    Build(i32),
    System(String),
    Cancelled,
    TimedOut,
    Crashed,
}

impl Runner {
    #[must_use]
    pub fn new(executor: impl Into<PathBuf>) -> Self {
        Self {
            executor: executor.into(),
            args: Vec::new(),
            env: Vec::new(),
            builds_dir: None,
            cache_dir: None,
            graceful_kill_timeout: Duration::from_mins(10),
            force_kill_timeout: Duration::from_secs(10),
            prepare_retry_delay: Duration::from_secs(3),
            echo: false,
            cache: None,
        }
    }

    /// Arguments put before the runner's own (`config_args`, `prepare_args`, ... all alike).
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Environment of the runner process (reaches every exec, like `KUBECONFIG` does in a pod).
    #[must_use]
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// `[[runners]] builds_dir` / `cache_dir` (used when `config_exec` returns none).
    #[must_use]
    pub fn dirs(mut self, builds_dir: &str, cache_dir: &str) -> Self {
        self.builds_dir = Some(builds_dir.to_owned());
        self.cache_dir = Some(cache_dir.to_owned());
        self
    }

    /// `graceful_kill_timeout` (runner default 600 s).
    #[must_use]
    pub fn graceful_kill_timeout(mut self, d: Duration) -> Self {
        self.graceful_kill_timeout = d;
        self
    }

    /// Delay between prepare attempts (runner: 3 s).
    #[must_use]
    pub fn prepare_retry_delay(mut self, d: Duration) -> Self {
        self.prepare_retry_delay = d;
        self
    }

    /// Also copy the job log to our stdout as it arrives (for the demo).
    #[must_use]
    pub fn echo(mut self, on: bool) -> Self {
        self.echo = on;
        self
    }

    /// Enable `[runners.cache]`: cache stages call `gitlab-runner cache-*` with presigned URLs.
    #[must_use]
    pub fn cache(mut self, presigner: CachePresigner) -> Self {
        self.cache = Some(presigner);
        self
    }

    pub async fn run(&self, job: &JobSpec) -> JobOutcome {
        self.run_with(job, None).await
    }

    pub async fn run_with(&self, job: &JobSpec, cancel: Option<Cancel>) -> JobOutcome {
        let tmp = tempfile::Builder::new()
            .prefix("custom-executor")
            .tempdir()
            .expect("create TMPDIR");
        let mut run = JobRun {
            runner: self,
            job,
            tmpdir: tmp.path().to_path_buf(),
            log: Arc::new(Mutex::new(Vec::new())),
            runner_log: Vec::new(),
            raw: Vec::new(),
            stages: Vec::new(),
            job_env: BTreeMap::new(),
            builds_dir: String::new(),
            hostname: None,
            cancel,
            cancelled: None,
            deadline: Instant::now() + Duration::from_secs(job.timeout_secs),
        };
        let result = run.execute().await;
        let mut log = String::from_utf8_lossy(&run.log.lock().expect("log lock")).into_owned();
        // For the secrets check: everything the executor printed, unmasked, and what must not be in it.
        if crate::logcapture::dir().is_some() {
            // A job script that prints its own secret on purpose (testing masking) is not a leak.
            let scripts: Vec<&String> = job
                .script
                .iter()
                .chain(&job.after_script)
                .chain(job.extra_steps.iter().flat_map(|(_, s)| s))
                .collect();
            for v in job.payload_variables().iter().filter(|v| v.masked) {
                let used = scripts.iter().any(|line| {
                    line.contains(&format!("${}", v.key))
                        || line.contains(&format!("${{{}}}", v.key))
                });
                if !used {
                    crate::logcapture::register_secret(&v.value);
                }
            }
            let mut all = run.raw.clone();
            all.extend_from_slice(&run.runner_log);
            crate::logcapture::write("executor", &all);
        }
        for secret in job.masked_values() {
            if !secret.is_empty() {
                log = log.replace(&secret, "[MASKED]");
            }
        }
        JobOutcome {
            log,
            runner_log: String::from_utf8_lossy(&run.runner_log).into_owned(),
            raw_output: String::from_utf8_lossy(&run.raw).into_owned(),
            result,
            stages: run.stages,
        }
    }
}

/// Section titles the runner prints before each stage.
fn stage_title(stage: &str) -> String {
    match stage {
        "prepare_script" => "Preparing environment".to_owned(),
        "get_sources" => "Getting source from Git repository".to_owned(),
        "restore_cache" => "Restoring cache".to_owned(),
        "download_artifacts" => "Downloading artifacts".to_owned(),
        "build_script" => "Executing \"step_script\" stage of the job script".to_owned(),
        "after_script" => "Running after_script".to_owned(),
        "archive_cache" => "Saving cache for successful job".to_owned(),
        "archive_cache_on_failure" => "Saving cache for failed job".to_owned(),
        "upload_artifacts_on_success" => "Uploading artifacts for successful job".to_owned(),
        "upload_artifacts_on_failure" => "Uploading artifacts for failed job".to_owned(),
        "cleanup_file_variables" => {
            "Cleaning up project directory and file based variables".to_owned()
        }
        other => format!("Executing \"{other}\" stage of the job script"),
    }
}

impl JobRun<'_> {
    fn log_line(&self, line: &str) {
        let mut log = self.log.lock().expect("log lock");
        log.extend_from_slice(line.as_bytes());
        log.push(b'\n');
        if self.runner.echo {
            println!("{line}");
        }
    }

    fn exit_code_file(&self) -> PathBuf {
        self.tmpdir.join("build_exit_code")
    }

    /// The environment of every exec (`prepareCommand`): runner env, fixed variables, `job_env`,
    /// then `CUSTOM_ENV_*` for every job variable and `CUSTOM_ENV_CI_JOB_SERVICES` last.
    fn exec_env(&self, status: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self.runner.env.clone();
        let tmp = self.tmpdir.to_string_lossy().into_owned();
        env.push(("TMPDIR".into(), tmp.clone()));
        env.push(("BUILD_FAILURE_EXIT_CODE".into(), "1".into()));
        env.push(("SYSTEM_FAILURE_EXIT_CODE".into(), "2".into()));
        env.push((
            "BUILD_EXIT_CODE_FILE".into(),
            self.exit_code_file().to_string_lossy().into_owned(),
        ));
        env.push(("JOB_RESPONSE_FILE".into(), format!("{tmp}/response.json")));
        env.extend(self.job_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let vars = self.job.all_variables(&self.builds_dir, status);
        let services = self.job.ci_job_services(&vars);
        for v in vars {
            env.push((format!("CUSTOM_ENV_{}", v.key), v.value));
        }
        env.push(("CUSTOM_ENV_CI_JOB_SERVICES".into(), services));
        env
    }

    async fn execute(&mut self) -> JobResult {
        self.log_line("Running with gitlab-runner 19.4.0 (d79f3e7b)");
        self.log_line("  on spotrun-harness AbCdEf123, system ID: r_harness");
        self.log_line("Preparing the \"custom\" executor");
        std::fs::write(self.tmpdir.join("response.json"), self.job.response_json())
            .expect("write response.json");

        // Prepare: config_exec + prepare_exec, retried 3 times for non-build errors, with
        // cleanup_exec after every failed attempt (`retryCreateExecutor`).
        let mut prepared = Err(ExecResult::System(String::new()));
        for attempt in 1..=3 {
            prepared = self.prepare_once().await;
            match &prepared {
                Ok(())
                | Err(
                    ExecResult::Build(_)
                    | ExecResult::Cancelled
                    | ExecResult::Crashed
                    | ExecResult::TimedOut,
                ) => break,
                Err(e) => {
                    self.cleanup().await;
                    if attempt < 3 {
                        self.log_line(&format!("WARNING: Preparation failed: {}", describe(e)));
                        self.log_line(&format!(
                            "Will be retried in {}s ...",
                            self.runner.prepare_retry_delay.as_secs()
                        ));
                        tokio::time::sleep(self.runner.prepare_retry_delay).await;
                    }
                }
            }
        }
        if let Err(e) = prepared {
            if e != ExecResult::Crashed {
                self.cleanup().await;
            }
            return self.finish(&e);
        }

        let mut failure: Option<ExecResult> = None;
        // 1. prepare_script and 2. get_sources: a failure here skips everything up to cleanup.
        let writer_hostname = self.hostname.clone();
        let builds_dir = self.builds_dir.clone();
        let w = ScriptWriter {
            job: self.job,
            builds_dir: &builds_dir,
            hostname: writer_hostname.as_deref(),
        };
        let prepare_script = w.prepare_script();
        let get_sources = w.get_sources();
        let r = self
            .stage(script::PREPARE_SCRIPT, &prepare_script, "running")
            .await;
        if r != ExecResult::Ok {
            return self.end(r).await;
        }
        let r = self
            .stage(script::GET_SOURCES, &get_sources, "running")
            .await;
        if r != ExecResult::Ok {
            let skip_rest = matches!(r, ExecResult::TimedOut | ExecResult::Crashed);
            if skip_rest {
                return self.end(r).await;
            }
            let cfv = w.cleanup_file_variables();
            let _ = self
                .stage(script::CLEANUP_FILE_VARIABLES, &cfv, "failed")
                .await;
            return self.end(r).await;
        }
        // 3. restore_cache, only when the job has cache paths and a cache is configured.
        let cache = self.job.cache.first().cloned();
        if let (Some(c), Some(presign)) = (&cache, self.runner.cache.clone()) {
            let object = self.cache_object(&c.key);
            let (get, _) = presign("GET", &object);
            let (head, _) = presign("HEAD", &object);
            let archive = self.cache_archive(&c.key);
            let s = w.restore_cache(&c.key, &archive, &get, &head);
            let r = self.stage(script::RESTORE_CACHE, &s, "running").await;
            if !matches!(r, ExecResult::Ok | ExecResult::Build(_)) {
                return self.end(r).await;
            }
        }
        // 5. build_script then step_*, stopping at the first error.
        let mut steps: Vec<(String, Vec<String>)> =
            vec![(script::BUILD_SCRIPT.to_owned(), self.job.script.clone())];
        steps.extend(
            self.job
                .extra_steps
                .iter()
                .map(|(n, l)| (format!("step_{n}"), l.clone())),
        );
        for (name, lines) in steps {
            let s = w.user_stage(&lines, "running");
            let r = self.stage(&name, &s, "running").await;
            if r != ExecResult::Ok {
                failure = Some(r);
                break;
            }
        }
        if matches!(
            failure,
            Some(ExecResult::TimedOut | ExecResult::Crashed | ExecResult::System(_))
        ) || self.cancelled == Some(CancelMode::Abort)
        {
            let r = failure.unwrap_or(ExecResult::Cancelled);
            return self.end(r).await;
        }
        let status = match &failure {
            None => "success",
            Some(ExecResult::Cancelled) => "canceled",
            Some(_) => "failed",
        };
        // 6. after_script: runs whenever stages 1-4 succeeded; its errors are ignored.
        if !self.job.after_script.is_empty() {
            let s = w.user_stage(&self.job.after_script, status);
            let r = self.stage(script::AFTER_SCRIPT, &s, status).await;
            match r {
                ExecResult::Ok => {}
                ExecResult::Build(code) => self.log_line(&format!(
                    "WARNING: after_script failed, but job will continue unaffected: exit status {code}"
                )),
                ExecResult::Crashed => return self.end(r).await,
                other => {
                    if failure.is_none() {
                        failure = Some(other);
                    }
                }
            }
        }
        // 7. archive_cache or archive_cache_on_failure (cache `when: on_success` → only the former).
        if failure.is_none()
            && let (Some(c), Some(presign)) = (&cache, self.runner.cache.clone())
        {
            let object = self.cache_object(&c.key);
            let (put, headers) = presign("PUT", &object);
            let (head, _) = presign("HEAD", &object);
            let archive = self.cache_archive(&c.key);
            let s = w.archive_cache(&c.key, &archive, &c.paths, &put, &headers, &head);
            let r = self.stage(script::ARCHIVE_CACHE, &s, status).await;
            if matches!(r, ExecResult::Crashed) {
                return self.end(r).await;
            }
            if let ExecResult::System(_) = r {
                failure = Some(r);
            }
        }
        // 9. cleanup_file_variables: always attempted, its error only logged.
        let cfv = w.cleanup_file_variables();
        let r = self
            .stage(script::CLEANUP_FILE_VARIABLES, &cfv, status)
            .await;
        if r == ExecResult::Crashed {
            return self.end(r).await;
        }
        self.end(failure.unwrap_or(ExecResult::Ok)).await
    }

    /// `runner/<short token>/project/<id>/<key>` (`cache/cache.go`).
    fn cache_object(&self, key: &str) -> String {
        format!(
            "runner/{}/project/{}/{key}",
            self.job.runner_short_token(),
            self.job.project_id
        )
    }

    fn cache_archive(&self, key: &str) -> String {
        let cache_dir = self.runner.cache_dir.as_deref().unwrap_or("/cache");
        format!("{cache_dir}/{}/{key}/cache.zip", self.job.project_path)
    }

    async fn prepare_once(&mut self) -> Result<(), ExecResult> {
        let env = self.exec_env("running");
        // config_exec: stdout is parsed as JSON, stderr goes to the job log; no job_env yet.
        let (r, stdout) = self.exec(&["config"], "config", env, false).await;
        if r != ExecResult::Ok {
            return Err(r);
        }
        let cfg: ConfigOutput = if stdout.trim_ascii().is_empty() {
            ConfigOutput::default()
        } else {
            serde_json::from_slice(&stdout)
                .map_err(|e| ExecResult::System(format!("error while parsing JSON output: {e}")))?
        };
        let driver = cfg.driver.unwrap_or_default();
        match (driver.name, driver.version) {
            (Some(n), Some(v)) => {
                self.log_line(&format!("Using Custom executor with driver {n} {v}..."));
            }
            _ => self.log_line("Using Custom executor..."),
        }
        let builds_dir = cfg.builds_dir.or_else(|| self.runner.builds_dir.clone());
        let cache_dir = cfg.cache_dir.or_else(|| self.runner.cache_dir.clone());
        let Some(builds_dir) = builds_dir else {
            return Err(ExecResult::Build(1)).inspect_err(|_| {
                self.log_line("ERROR: the builds_dir is not configured");
            });
        };
        if cache_dir.is_none() {
            self.log_line("ERROR: the cache_dir is not configured");
            return Err(ExecResult::Build(1));
        }
        self.builds_dir = builds_dir;
        self.hostname = cfg.hostname;
        self.job_env = cfg.job_env;
        let env = self.exec_env("running");
        let (r, _) = self.exec(&["prepare"], "prepare", env, true).await;
        if r == ExecResult::Ok { Ok(()) } else { Err(r) }
    }

    async fn stage(&mut self, stage: &str, script: &str, status: &str) -> ExecResult {
        if Instant::now() >= self.deadline {
            return ExecResult::TimedOut;
        }
        self.log_line(&stage_title(stage));
        let dir = self.tmpdir.join(format!("script{}", rand::random::<u32>()));
        std::fs::create_dir(&dir).expect("script dir");
        let path = dir.join("script");
        let script = self
            .job
            .raw_scripts
            .iter()
            .find(|(s, _)| s == stage)
            .map_or(script, |(_, raw)| raw.as_str());
        std::fs::write(&path, script).expect("write script");
        set_mode(&path, 0o700);
        let env = self.exec_env(status);
        let path = path.to_string_lossy().into_owned();
        let (r, _) = self.exec(&["run", &path, stage], stage, env, true).await;
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    async fn cleanup(&mut self) {
        let env = self.exec_env("running");
        // cleanup_exec: output to the runner log only; its result never changes the job status.
        let saved_deadline = self.deadline;
        self.deadline = Instant::now() + Duration::from_hours(1);
        let cancel = self.cancel.take();
        let (r, _) = self.exec(&["cleanup"], "cleanup", env, false).await;
        self.cancel = cancel;
        self.deadline = saved_deadline;
        if r != ExecResult::Ok {
            self.runner_log
                .extend_from_slice(format!("Cleanup script failed: {}\n", describe(&r)).as_bytes());
        }
    }

    async fn end(&mut self, r: ExecResult) -> JobResult {
        if r != ExecResult::Crashed {
            self.cleanup().await;
        }
        self.finish(&r)
    }

    fn finish(&self, r: &ExecResult) -> JobResult {
        let result = match r {
            ExecResult::Ok => JobResult::Success,
            ExecResult::Build(code) => JobResult::BuildFailure { exit_code: *code },
            ExecResult::System(reason) => JobResult::SystemFailure {
                reason: reason.clone(),
            },
            ExecResult::Cancelled | ExecResult::Crashed => JobResult::Canceled,
            ExecResult::TimedOut => JobResult::TimedOut,
        };
        match &result {
            JobResult::Success => self.log_line("Job succeeded"),
            JobResult::BuildFailure { exit_code } => {
                self.log_line(&format!("ERROR: Job failed: exit status {exit_code}"));
            }
            JobResult::SystemFailure { reason } => {
                self.log_line(&format!("ERROR: Job failed (system failure): {reason}"));
            }
            JobResult::Canceled => self.log_line("ERROR: Job failed: canceled"),
            JobResult::TimedOut => {
                self.log_line("ERROR: Job failed: execution took longer than the job timeout");
            }
        }
        result
    }

    /// Run one exec with the runner's process handling; returns its classified result and stdout
    /// (only captured separately for `config`).
    async fn exec(
        &mut self,
        args: &[&str],
        stage: &str,
        env: Vec<(String, String)>,
        to_job_log: bool,
    ) -> (ExecResult, Vec<u8>) {
        let _ = std::fs::metadata(self.exit_code_file());
        let mut cmd = Command::new(&self.runner.executor);
        cmd.args(&self.runner.args)
            .args(args)
            .current_dir(&self.tmpdir)
            .env_clear()
            .envs(std::env::vars())
            .envs(env)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        let is_config = stage == "config";
        let (reader, writer) = std::io::pipe().expect("pipe");
        let stdout_capture = Arc::new(Mutex::new(Vec::new()));
        if is_config {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(writer.try_clone().expect("dup pipe"));
        }
        cmd.stderr(writer);
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return (
                    ExecResult::System(format!("failed to start command: {e}")),
                    Vec::new(),
                );
            }
        };
        drop(cmd); // closes our copies of the pipe's write end
        let mut config_stdout = child.stdout.take();
        let capture = stdout_capture.clone();
        let config_reader = tokio::spawn(async move {
            if let Some(out) = config_stdout.as_mut() {
                let mut buf = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(out, &mut buf).await;
                capture.lock().expect("capture").extend_from_slice(&buf);
            }
        });
        // One pipe for stdout and stderr, like Go's exec with the same writer for both.
        let job_log = self.log.clone();
        let echo = self.runner.echo;
        let pump = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            let mut all = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                match std::io::Read::read(&mut reader, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        all.extend_from_slice(&buf[..n]);
                        if to_job_log {
                            job_log.lock().expect("log").extend_from_slice(&buf[..n]);
                            if echo {
                                use std::io::Write;
                                let _ = std::io::stdout().write_all(&buf[..n]);
                            }
                        }
                    }
                }
            }
            all
        });
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        let cancel_at = self
            .cancel
            .as_ref()
            .filter(|c| c.stage == stage)
            .map(|c| (started + c.after, c.mode));
        let deadline = self.deadline;
        let mut record = StageRecord {
            stage: stage.to_owned(),
            exit_code: None,
            duration: Duration::ZERO,
            ended_at: started,
            exit_after_sigterm: None,
            killed: false,
        };
        let mut outcome_override = None;
        let status = tokio::select! {
            s = child.wait() => s,
            () = sleep_until_opt(cancel_at.map(|c| c.0)) => {
                let mode = cancel_at.map_or(CancelMode::Abort, |c| c.1);
                self.cancelled = Some(mode);
                if mode == CancelMode::RunnerCrash {
                    if let Some(pid) = pid { let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL); }
                    outcome_override = Some(ExecResult::Crashed);
                    child.wait().await
                } else {
                    outcome_override = Some(ExecResult::Cancelled);
                    self.terminate(&mut child, pid, &mut record).await
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                outcome_override = Some(ExecResult::TimedOut);
                self.terminate(&mut child, pid, &mut record).await
            }
        };
        record.ended_at = Instant::now();
        // A grandchild that kept the pipe open must not hang the job (the runner stops reading
        // when the exec returns, too).
        let output = tokio::time::timeout(Duration::from_secs(10), pump)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let _ = config_reader.await;
        record.duration = started.elapsed();
        let status = status.ok();
        record.exit_code = status.and_then(|s| s.code());
        self.stages.push(record);
        self.raw.extend_from_slice(&output);
        let stdout = std::mem::take(&mut *stdout_capture.lock().expect("capture"));
        self.raw.extend_from_slice(&stdout);
        if !to_job_log && !is_config {
            self.runner_log.extend_from_slice(&output);
        }
        if is_config && !output.is_empty() {
            self.log.lock().expect("log").extend_from_slice(&output);
        }
        if let Some(o) = outcome_override {
            return (o, stdout);
        }
        (self.classify(status.and_then(|s| s.code())), stdout)
    }

    /// SIGTERM to the group, wait `graceful_kill_timeout`, SIGKILL, wait `force_kill_timeout`.
    async fn terminate(
        &self,
        child: &mut tokio::process::Child,
        pid: Option<i32>,
        record: &mut StageRecord,
    ) -> std::io::Result<std::process::ExitStatus> {
        let sent = Instant::now();
        if let Some(pid) = pid {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if let Ok(s) = tokio::time::timeout(self.runner.graceful_kill_timeout, child.wait()).await {
            record.exit_after_sigterm = Some(sent.elapsed());
            return s;
        }
        record.killed = true;
        if let Some(pid) = pid {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let s = tokio::time::timeout(self.runner.force_kill_timeout, child.wait())
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::other(
                    "failed to kill process, likely process is dormant",
                ))
            });
        record.exit_after_sigterm = Some(sent.elapsed());
        s
    }

    /// `waitForCommand` + `parseBuildFailure`: 1 reads the exit-code file, 2 is a system failure,
    /// anything else is an unknown (system) failure.
    fn classify(&self, code: Option<i32>) -> ExecResult {
        match code {
            Some(0) => ExecResult::Ok,
            Some(1) => match std::fs::read_to_string(self.exit_code_file()) {
                Err(_) => ExecResult::Build(1),
                Ok(text) => match text.lines().next().unwrap_or("").trim().parse::<i32>() {
                    Ok(n) => ExecResult::Build(n),
                    Err(_) => ExecResult::System(format!(
                        "unknown Custom executor executable exit code 1; invalid build exit code file content {text:?}"
                    )),
                },
            },
            Some(2) => ExecResult::System("exit status 2".to_owned()),
            Some(n) => ExecResult::System(format!(
                "unknown Custom executor executable exit code {n}; executable execution terminated with: exit status {n}"
            )),
            None => ExecResult::System(
                "unknown Custom executor executable exit code -1; executable execution terminated with: signal".to_owned(),
            ),
        }
    }
}

fn describe(r: &ExecResult) -> String {
    match r {
        ExecResult::Ok => "ok".to_owned(),
        ExecResult::Build(n) => format!("exit status {n}"),
        ExecResult::System(s) => s.clone(),
        ExecResult::Cancelled => "canceled".to_owned(),
        ExecResult::TimedOut => "timed out".to_owned(),
        ExecResult::Crashed => "runner crashed".to_owned(),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}
