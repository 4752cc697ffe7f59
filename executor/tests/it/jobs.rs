//! Whole jobs through the runner harness: success, build failure, routing, placement, bad input.

use std::time::Duration;

use spotrun_testkit::emulator::{EmulatorConfig, ImageRule, PullOutcome};
use spotrun_testkit::harness::{JobBuilder, JobResult, Service};

use crate::support::{Env, node_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_passes_and_stages_run_in_the_right_containers() {
    let env = Env::start("[spot]\npolicy = \"require\"\n").await;
    // The marker files land on the shared builds volume; the container is told apart by the
    // helper's PATH (only the helper has the tools dir first).
    let job = JobBuilder::new(5001)
        .script(&["echo step-one", "echo \"build sees PATH=$PATH\" | grep -q /spotrun/bin && echo WRONG-CONTAINER || echo build-container-ok", "echo step-two"])
        .after_script(&["echo after-ran"])
        .build();
    let out = env.runner().run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    let log = &out.log;
    for needle in ["step-one", "build-container-ok", "step-two", "after-ran"] {
        assert!(log.contains(needle), "missing {needle} in\n{log}");
    }
    assert!(log.find("step-one").unwrap() < log.find("step-two").unwrap());
    assert!(node_of(log).starts_with("gke-spot-"), "{log}");
    let starts: Vec<String> = env
        .events()
        .iter()
        .filter(|e| e["event"] == "stage_end")
        .map(|e| {
            format!(
                "{}@{}",
                e["stage"].as_str().unwrap(),
                e["container"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        starts.contains(&"prepare_script@helper".to_string()),
        "{starts:?}"
    );
    assert!(
        starts.contains(&"get_sources@helper".to_string()),
        "{starts:?}"
    );
    assert!(
        starts.contains(&"build_script@build".to_string()),
        "{starts:?}"
    );
    assert!(
        starts.contains(&"after_script@build".to_string()),
        "{starts:?}"
    );
    assert!(
        env.no_pods_within(Duration::from_secs(20)).await,
        "cleanup left a pod"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_42_is_a_build_failure_with_code_42_and_after_script_runs() {
    let env = Env::start("").await;
    let job = JobBuilder::new(5002)
        .script(&["echo before", "exit 42", "echo unreachable"])
        .after_script(&["echo after-ran"])
        .build();
    let out = env.runner().run(&job).await;
    assert_eq!(
        out.result,
        JobResult::BuildFailure { exit_code: 42 },
        "{}",
        out.log
    );
    assert!(out.log.contains("after-ran"), "{}", out.log);
    assert!(!out.log.contains("unreachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_policies_place_pods() {
    for (policy, want_spot) in [("require", true), ("prefer", true), ("never", false)] {
        let env = Env::start(&format!("[spot]\npolicy = \"{policy}\"\n")).await;
        let out = env
            .runner()
            .run(&JobBuilder::new(5003).script(&["echo placed"]).build())
            .await;
        assert_eq!(out.result, JobResult::Success, "{policy}: {}", out.log);
        let node = node_of(&out.log);
        assert_eq!(
            node.starts_with("gke-spot-"),
            want_spot,
            "{policy} → {node}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_is_reachable_by_alias() {
    let env = Env::start("").await;
    let svc = Service::new("python:3.13", "web").command(&[
        "python3",
        "-m",
        "http.server",
        "18087",
        "--bind",
        "127.0.0.1",
    ]);
    let job = JobBuilder::new(5004)
        .service(svc)
        .script(&["for i in $(seq 1 50); do python3 -c 'import urllib.request;print(urllib.request.urlopen(\"http://web:18087/\").status)' 2>/dev/null && break; sleep 0.2; done"])
        .build();
    let out = env.runner().run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(out.log.contains("200"), "{}", out.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_cap_cpu_and_disallowed_image_fail_with_one_line_and_no_pod() {
    let env =
        Env::start("[resources]\noverwrite_over_max = \"fail\"\n[resources.job_max]\ncpu = \"2\"\n[images]\nallowed_images = [\"alpine:*\"]\n")
            .await;
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5005)
                .variable("SPOTRUN_CPU_LIMIT", "3")
                .build(),
        )
        .await;
    assert!(
        matches!(out.result, JobResult::BuildFailure { exit_code: 1 }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(
        out.log.contains("SPOTRUN_CPU_LIMIT") && out.log.contains("maximum 2"),
        "{}",
        out.log
    );
    let out = env
        .runner()
        .run(&JobBuilder::new(5006).image("evil/miner:1").build())
        .await;
    assert!(
        matches!(out.result, JobResult::BuildFailure { exit_code: 1 }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(out.log.contains("evil/miner:1"), "{}", out.log);
    assert!(
        env.no_pods_within(Duration::from_secs(20)).await,
        "a pod was left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stage_name_and_missing_payload_are_refused() {
    let env = Env::start("").await;
    let script = env.dir.path().join("script");
    std::fs::write(&script, "echo hi\n").unwrap();
    let code_file = env.dir.path().join("code");
    let out = env.exec(
        &["run", script.to_str().unwrap(), "../etc"],
        &[
            ("CUSTOM_ENV_CI_JOB_ID", "7"),
            ("BUILD_EXIT_CODE_FILE", code_file.to_str().unwrap()),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stage name \"../etc\" is not allowed"));
    let out = env.exec(
        &["prepare"],
        &[
            ("CUSTOM_ENV_CI_JOB_ID", "7"),
            ("JOB_RESPONSE_FILE", "/nonexistent/response.json"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/nonexistent/response.json"));
    let bad = env.dir.path().join("bad.toml");
    std::fs::write(&bad, "namespace = \"ci-jobs\"\nunknown_knob = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spotrun-executor"))
        .args(["--config", bad.to_str().unwrap(), "config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_knob"));
    assert!(out.stdout.is_empty());
}

/// `run` for a job whose pod is gone (deleted by hand, or prepare never ran): a system failure
/// naming the pod, not a hang or a script failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_the_job_pod_is_a_system_failure_naming_it() {
    let env = Env::start("").await;
    let script = env.dir.path().join("script");
    std::fs::write(&script, "echo hi\n").unwrap();
    let code_file = env.dir.path().join("code");
    let out = tokio::task::block_in_place(|| {
        env.exec(
            &["run", script.to_str().unwrap(), "build_script"],
            &[
                ("CUSTOM_ENV_CI_JOB_ID", "9"),
                ("BUILD_FAILURE_EXIT_CODE", "1"),
                ("SYSTEM_FAILURE_EXIT_CODE", "2"),
                ("BUILD_EXIT_CODE_FILE", code_file.to_str().unwrap()),
            ],
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("does not exist") && stdout.contains("ci-jobs/"),
        "{stdout}"
    );
    assert!(
        !code_file.exists(),
        "no script exit code for a system failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pull_failure_is_a_build_failure_naming_the_image() {
    let mut cfg = EmulatorConfig::gke();
    cfg.images.insert(
        0,
        ImageRule {
            pattern: "registry.example.com/team/missing:*".into(),
            outcome: PullOutcome::NotFound,
            default_command: None,
            env: Vec::new(),
            bin_dirs: Vec::new(),
            rootfs: None,
            user: None,
        },
    );
    let env = Env::start_with(cfg, "").await;
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5101)
                .image("registry.example.com/team/missing:1.0")
                .build(),
        )
        .await;
    assert!(
        matches!(out.result, JobResult::BuildFailure { exit_code: 1 }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(
        out.log.contains("registry.example.com/team/missing:1.0"),
        "{}",
        out.log
    );
    // Fail fast: the emulator reports ErrImagePull as soon as the pod is scheduled; a generous
    // liveness bound (not a benchmark, far below the 1800 s prepare timeout it must not sit out)
    // that a loaded machine cannot break.
    let prepare = out.stage("prepare").expect("prepare ran");
    assert!(
        prepare.duration < Duration::from_secs(120),
        "prepare took {:?}",
        prepare.duration
    );
    assert!(
        out.stage("build_script").is_none(),
        "no stage may run after a failed prepare"
    );
    assert!(
        env.no_pods_within(Duration::from_secs(20)).await,
        "a pod was left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_is_a_system_failure_with_the_scheduler_message() {
    // Nodes have 4 cores; the job asks for 32, within the operator's cap of 64.
    let env = Env::start("[resources.job_max]\ncpu = \"64\"\n").await;
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5102)
                .variable("SPOTRUN_CPU_REQUEST", "32")
                .variable("SPOTRUN_CPU_LIMIT", "32")
                .build(),
        )
        .await;
    assert!(
        matches!(out.result, JobResult::SystemFailure { .. }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(
        out.log.contains("Insufficient cpu"),
        "the scheduler's message must reach the job log:\n{}",
        out.log
    );
    assert!(out.log.contains("unschedulable"), "{}", out.log);
    assert!(
        env.no_pods_within(Duration::from_secs(20)).await,
        "a pod was left"
    );
}

/// With no `events_log` setting, event lines go to the runner's own stderr, never into the job
/// log (the runner copies the driver's stderr there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_events_log_never_lands_in_the_job_log() {
    let env = Env::start("").await;
    std::fs::write(
        &env.settings,
        "namespace = \"ci-jobs\"\n[timeouts]\nexec_silence_seconds = 5\n",
    )
    .unwrap();
    let out = env
        .runner()
        .run(&JobBuilder::new(5301).script(&["echo quiet"]).build())
        .await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(out.log.contains("quiet"), "{}", out.log);
    assert!(
        !out.log.contains("\"event\":"),
        "event lines in the job log:\n{}",
        out.log
    );
}
