//! The runner harness against a host-only fake executor: stage order, exit-code rules, prepare
//! retries with cleanup, cancellation, masking.

use std::path::PathBuf;
use std::time::Duration;

use spotrun_testkit::harness::{Cancel, CancelMode, JobBuilder, JobResult, Runner};

fn fake(state: &std::path::Path) -> Runner {
    let exe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/fake-executor.sh");
    Runner::new(exe)
        .env("FAKE_STATE", state.to_string_lossy())
        .prepare_retry_delay(Duration::from_millis(10))
        .graceful_kill_timeout(Duration::from_secs(5))
}

fn calls(state: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(state.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut parts = l.split(' ');
            let first = parts.next().unwrap_or("").to_owned();
            if first == "run" {
                parts.nth(1).unwrap_or("").to_owned()
            } else {
                first
            }
        })
        .collect()
}

#[tokio::test]
async fn success_runs_stages_in_runner_order() {
    let state = tempfile::tempdir().unwrap();
    let job = JobBuilder::new(101)
        .script(&["echo building $CI_JOB_ID"])
        .after_script(&["echo after $CI_JOB_STATUS"])
        .build();
    let out = fake(state.path()).run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert_eq!(
        calls(state.path()),
        [
            "config",
            "prepare",
            "prepare_script",
            "get_sources",
            "build_script",
            "after_script",
            "cleanup_file_variables",
            "cleanup"
        ]
    );
    assert!(
        out.log
            .contains("Using Custom executor with driver fake 0.1..."),
        "{}",
        out.log
    );
    assert!(out.log.contains("config on stderr"));
    assert!(out.log.contains("prepared with alpine:3.20"));
    assert!(
        out.log
            .contains("\n\u{1b}[32;1m$ echo building $CI_JOB_ID\u{1b}[0;m\nbuilding 101\n"),
        "{}",
        out.log
    );
    assert!(out.log.contains("after success"));
    assert!(out.log.ends_with("Job succeeded\n"));
    assert!(
        !out.log.contains("cleaned up"),
        "cleanup output belongs to the runner log"
    );
    assert!(out.runner_log.contains("cleaned up"));
}

#[tokio::test]
async fn script_exit_code_comes_from_the_exit_code_file_and_after_script_runs() {
    let state = tempfile::tempdir().unwrap();
    let job = JobBuilder::new(102)
        .script(&["exit 42"])
        .after_script(&["echo after $CI_JOB_STATUS"])
        .build();
    let out = fake(state.path()).run(&job).await;
    assert_eq!(out.result, JobResult::BuildFailure { exit_code: 42 });
    assert!(out.log.contains("after failed"), "{}", out.log);
    assert!(out.log.ends_with("ERROR: Job failed: exit status 42\n"));
}

#[tokio::test]
async fn prepare_is_retried_with_cleanup_between_attempts() {
    let state = tempfile::tempdir().unwrap();
    let job = JobBuilder::new(103).build();
    let out = fake(state.path())
        .env("FAKE_PREPARE_FAILURES", "2")
        .run(&job)
        .await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    let c = calls(state.path());
    assert_eq!(
        &c[..7],
        [
            "config", "prepare", "cleanup", "config", "prepare", "cleanup", "config"
        ]
    );
    assert_eq!(
        out.log
            .matches("WARNING: Preparation failed: exit status 2")
            .count(),
        2
    );

    let state = tempfile::tempdir().unwrap();
    let out = fake(state.path())
        .env("FAKE_PREPARE_FAILURES", "3")
        .run(&job)
        .await;
    assert!(
        matches!(out.result, JobResult::SystemFailure { .. }),
        "{:?}",
        out.result
    );
    assert_eq!(
        calls(state.path())
            .iter()
            .filter(|c| *c == "prepare")
            .count(),
        3
    );
}

#[tokio::test]
async fn system_failure_exit_code_is_reported_as_such() {
    let state = tempfile::tempdir().unwrap();
    let job = JobBuilder::new(104).script(&["false"]).build();
    let out = fake(state.path())
        .env("FAKE_SYSTEM_FAIL_STAGE", "build_script")
        .run(&job)
        .await;
    assert_eq!(
        out.result,
        JobResult::SystemFailure {
            reason: "exit status 2".into()
        }
    );
    assert!(
        out.log
            .contains("ERROR: Job failed (system failure): exit status 2")
    );
}

#[tokio::test]
async fn abort_sends_sigterm_skips_later_stages_and_still_cleans_up() {
    let state = tempfile::tempdir().unwrap();
    let job = JobBuilder::new(105)
        .script(&["sleep 30"])
        .after_script(&["echo after"])
        .build();
    let cancel = Cancel {
        stage: "build_script".into(),
        after: Duration::from_millis(300),
        mode: CancelMode::Abort,
    };
    let out = fake(state.path()).run_with(&job, Some(cancel)).await;
    assert_eq!(out.result, JobResult::Canceled);
    let rec = out.stage("build_script").unwrap();
    assert!(
        // Far below the script's 30 s sleep: the stage ended on SIGTERM, not on its own.
        rec.exit_after_sigterm.unwrap() < Duration::from_secs(20),
        "{rec:?}"
    );
    assert!(!rec.killed);
    let c = calls(state.path());
    assert_eq!(c.last().map(String::as_str), Some("cleanup"));
    assert!(!c.contains(&"after_script".to_owned()));
}

#[tokio::test]
async fn runner_crash_runs_nothing_afterwards() {
    let state = tempfile::tempdir().unwrap();
    let job = JobBuilder::new(106).script(&["sleep 30"]).build();
    let cancel = Cancel {
        stage: "build_script".into(),
        after: Duration::from_millis(200),
        mode: CancelMode::RunnerCrash,
    };
    let out = fake(state.path()).run_with(&job, Some(cancel)).await;
    assert_eq!(out.result, JobResult::Canceled);
    assert_eq!(
        calls(state.path()).last().map(String::as_str),
        Some("build_script")
    );
}

#[tokio::test]
async fn masked_values_never_reach_the_job_log() {
    let state = tempfile::tempdir().unwrap();
    let job = JobBuilder::new(107)
        .masked_variable("SONAR_TOKEN", "sqp_supersecretvalue123")
        .script(&["echo token=$SONAR_TOKEN"])
        .build();
    let out = fake(state.path()).run(&job).await;
    assert!(out.log.contains("token=[MASKED]"), "{}", out.log);
    assert!(!out.log.contains("sqp_supersecretvalue123"));
    assert!(
        out.raw_output.contains("sqp_supersecretvalue123"),
        "raw output keeps what was printed"
    );
}

#[tokio::test]
async fn get_sources_fetches_a_real_git_repository() {
    let state = tempfile::tempdir().unwrap();
    let repo = state.path().join("src");
    let git = |args: &[&str]| {
        let s = std::process::Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(s.status.success(), "{s:?}");
        String::from_utf8(s.stdout).unwrap()
    };
    std::fs::create_dir_all(&repo).unwrap();
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("hello.txt"), "from git\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "init"]);
    let sha = git(&["rev-parse", "HEAD"]).trim().to_owned();
    let job = JobBuilder::new(108)
        .repo(&format!("file://{}", repo.display()), "main", &sha)
        .script(&["cat hello.txt"])
        .build();
    let out = fake(state.path()).run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(out.log.contains("Checking out"));
    assert!(out.log.contains("\nfrom git\n"), "{}", out.log);
}
