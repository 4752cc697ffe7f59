//! Issue 4 through the emulator's fault knobs: preemption + fallback, exec cuts, API errors,
//! cancellation and gc of orphans.

use std::time::{Duration, Instant};

use spotrun_testkit::emulator::{EmulatorConfig, ImageRule, PullOutcome};
use spotrun_testkit::harness::{Cancel, CancelMode, JobBuilder, JobResult};

use crate::support::{Env, between, node_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_mid_build_falls_back_to_on_demand_on_retry() {
    for fallback in [true, false] {
        let env = Env::start(&format!(
            "[spot]\npolicy = \"require\"\nfallback_on_preemption = {fallback}\n"
        ))
        .await;
        let job = JobBuilder::new(6001)
            .name("integration")
            .script(&["echo started", "sleep 600"])
            .build();
        let runner = env.runner();
        let faults = env.emu.faults();
        let log_events = env.events.clone();
        let handle = tokio::spawn(async move { runner.run(&job).await });
        // Wait until the build stage runs, then reclaim its node.
        let deadline = Instant::now() + Duration::from_secs(60);
        let node = loop {
            let text = std::fs::read_to_string(&log_events).unwrap_or_default();
            if text.contains("\"stage\":\"build_script\"") && text.contains("stage_start") {
                let pods = env.pods().await;
                if let Some(n) = pods
                    .first()
                    .and_then(|p| p.spec.as_ref()?.node_name.clone())
                {
                    break n;
                }
            }
            assert!(Instant::now() < deadline, "build_script never started");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let preempted_at = Instant::now();
        faults.preempt_node(&node);
        // A liveness bound only, far from both outcomes (noticed: seconds; missed: the 600 s
        // sleep); the latency itself is a benchmark figure.
        let out = tokio::time::timeout(Duration::from_secs(120), handle)
            .await
            .expect("the preemption was noticed")
            .unwrap();
        let took = preempted_at.elapsed();
        assert!(
            matches!(out.result, JobResult::SystemFailure { .. }),
            "{:?}\n{}",
            out.result,
            out.log
        );
        assert!(
            out.log.contains(&format!("preempted on node {node}")),
            "{}",
            out.log
        );
        let stage = out.stage("build_script").expect("build_script ran");
        assert_eq!(stage.exit_code, Some(2));
        println!("preemption → binary exit: {took:?} (fallback {fallback})");
        // The retry: a new job id, same project, pipeline and job name.
        let retry = JobBuilder::new(6002)
            .name("integration")
            .script(&["echo retried"])
            .build();
        let out = env.runner().run(&retry).await;
        assert_eq!(out.result, JobResult::Success, "{}", out.log);
        let retry_node = node_of(&out.log);
        assert_eq!(
            retry_node.starts_with("gke-spot-"),
            !fallback,
            "fallback={fallback}: {retry_node}\n{}",
            out.log
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stream_cut_mid_stage_gives_identical_log_and_exit_code() {
    let script = [
        "for i in $(seq 1 200); do echo line-$i-abcdefghijklmnopqrstuvwxyz; done",
        "sleep 0.5",
        "for i in $(seq 201 400); do echo line-$i; done",
        "exit 3",
    ];
    let env = Env::start("").await;
    let clean = env
        .runner()
        .run(&JobBuilder::new(6101).script(&script).build())
        .await;
    assert_eq!(
        clean.result,
        JobResult::BuildFailure { exit_code: 3 },
        "{}",
        clean.log
    );
    let env2 = Env::start("").await;
    // Every exec session is cut after 1500 output bytes: only the build stage's follower gets that
    // far, about 6 times in this stage.
    env2.emu.faults().cut_execs_after(1500, 1000);
    let cut = env2
        .runner()
        .run(&JobBuilder::new(6101).script(&script).build())
        .await;
    assert_eq!(
        cut.result,
        JobResult::BuildFailure { exit_code: 3 },
        "{}",
        cut.log
    );
    let a = between(&clean.log, "line-1-", "line-400\n");
    let b = between(&cut.log, "line-1-", "line-400\n");
    assert!(a.len() > 8000);
    assert_eq!(a, b, "stage output differs after exec cuts");
    let reconnects = env2
        .events()
        .iter()
        .filter(|e| e["event"] == "exec_reconnect")
        .count();
    assert!(reconnects >= 5, "only {reconnects} reconnects");
}

/// The job kills the process that waits for its script (`$PPID` of the stage's shell): the script
/// ends with nobody to record its exit code. The stage is a system failure with one clear line
/// (3 s after the script ended), not a wait for the job timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_exit_code_was_never_recorded_is_a_system_failure() {
    let env = Env::start("").await;
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        env.runner().run(
            &JobBuilder::new(6151)
                .script(&["kill -KILL $PPID", "echo still-running"])
                .build(),
        ),
    )
    .await
    .expect("the lost exit code was noticed");
    assert!(
        matches!(out.result, JobResult::SystemFailure { .. }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(out.log.contains("still-running"), "{}", out.log);
    assert!(
        out.log.contains("ended without recording an exit code"),
        "{}",
        out.log
    );
}

/// One API request in five fails, deterministically (every 5th, alternating 500 and 429): a job
/// makes more than five requests, so recovery is always exercised (issue 17: random 20 %
/// sometimes injected nothing once jobs made few calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_on_20_percent_of_requests_do_not_change_the_job() {
    let env = Env::start("").await;
    env.emu.faults().fail_every(5, &[500, 429]);
    let out = env
        .runner()
        .run(
            &JobBuilder::new(6201)
                .script(&["echo resilient-output"])
                .build(),
        )
        .await;
    env.emu.faults().clear();
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(out.log.contains("resilient-output"));
    // kube-rs retries a 429 by itself; a 500 reaches the executor.
    let injected = env.emu.audit().iter().filter(|a| a.code == 500).count();
    assert!(injected >= 1, "no 500 was injected");
    // Failed requests may hit plain calls (api_retry), watches (watch_error) or execs
    // (exec_reconnect); each must have been recovered from.
    let recovered = env
        .events()
        .iter()
        .filter(|e| {
            matches!(
                e["event"].as_str(),
                Some("api_retry" | "watch_error" | "exec_reconnect")
            )
        })
        .count();
    assert!(
        recovered >= 1,
        "{injected} requests failed with 500 but no recovery was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_run_kills_remote_processes_and_cleanup_leaves_nothing() {
    let env = Env::start("").await;
    let marker = env.dir.path().join("still-running");
    let job = JobBuilder::new(6301)
        .script(&[&format!("sleep 3; touch {}", marker.display())])
        .build();
    let cancel = Cancel {
        stage: "build_script".into(),
        after: Duration::from_millis(1500),
        mode: CancelMode::Abort,
    };
    let out = env.runner().run_with(&job, Some(cancel)).await;
    let stage = out.stage("build_script").expect("ran");
    // The executor bounds its cancel to about 3 s; not needing the runner's SIGKILL (10 s after
    // SIGTERM here) is the property, with room for a loaded machine.
    let exit_after = stage.exit_after_sigterm.expect("was signalled");
    assert!(!stage.killed, "SIGKILL was needed: {exit_after:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!marker.exists(), "the stage kept running in the pod");
    assert!(
        env.no_pods_within(Duration::from_secs(20)).await,
        "a pod was left"
    );
    assert!(env.secrets().await.is_empty());
    // cleanup twice → both succeed.
    for _ in 0..2 {
        let o = env.exec(
            &["cleanup"],
            &[
                ("CUSTOM_ENV_CI_JOB_ID", "6301"),
                ("CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN", "t1_AbCdEf"),
            ],
        );
        assert!(o.status.success(), "{o:?}");
        assert!(o.stdout.is_empty());
    }
}

/// The runner dies during `prepare` (the build image's pull takes 2 s, so the crash at 200 ms
/// always lands while prepare waits for the pod): the pod it leaves is listed by `gc --dry-run`,
/// alone, and removed by `gc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_dry_run_lists_exactly_the_orphans_of_a_crashed_runner() {
    let mut cfg = EmulatorConfig::gke();
    cfg.images.insert(
        0,
        ImageRule {
            pattern: "alpine:*".into(),
            outcome: PullOutcome::Delay(Duration::from_secs(2)),
            default_command: None,
            env: Vec::new(),
            bin_dirs: Vec::new(),
            rootfs: None,
            user: None,
        },
    );
    let env = Env::start_with(cfg, "").await;
    // Pod never finishes prepare: stale after 0 s for this gc run.
    std::fs::write(
        &env.settings,
        crate::support::settings_toml(&env.events, "")
            .replace("[timeouts]\n", "[timeouts]\nstale_prepare_seconds = 0\n"),
    )
    .unwrap();
    let job = JobBuilder::new(6401).script(&["sleep 30"]).build();
    let cancel = Cancel {
        stage: "prepare".into(),
        after: Duration::from_millis(200),
        mode: CancelMode::RunnerCrash,
    };
    let _ = env.runner().run_with(&job, Some(cancel)).await;
    // Pod ages are whole seconds (creationTimestamp): past a second boundary the pod is older than
    // the 0 s threshold.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let pods: Vec<String> = env
        .pods()
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(pods.len(), 1, "the crashed runner left its pod: {pods:?}");
    let out = env.exec(&["gc", "--dry-run"], &[]);
    assert!(out.status.success(), "{out:?}");
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    for p in &pods {
        assert!(
            listed.contains(&format!("pod/{p}")),
            "{p} not listed: {listed}"
        );
    }
    assert_eq!(
        listed.lines().filter(|l| l.contains("pod/")).count(),
        pods.len(),
        "{listed}"
    );
    let out = env.exec(&["gc"], &[]);
    assert!(out.status.success());
    assert!(
        env.no_pods_within(Duration::from_secs(20)).await,
        "a pod was left"
    );
}

/// The stage output used by the stream-fault tests: ~5 KB in bursts, then a failing exit.
const BURSTY: [&str; 4] = [
    "for i in $(seq 1 100); do echo line-$i-abcdefghijklmnopqrstuvwxyz; done",
    "sleep 0.5",
    "for i in $(seq 101 200); do echo line-$i-abcdefghijklmnopqrstuvwxyz; done",
    "exit 7",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_exec_stream_without_frames_or_pongs_is_detected_and_resumed() {
    let env = Env::start("").await;
    let clean = env
        .runner()
        .run(&JobBuilder::new(6401).script(&BURSTY).build())
        .await;
    assert_eq!(
        clean.result,
        JobResult::BuildFailure { exit_code: 7 },
        "{}",
        clean.log
    );
    // Every exec session goes dead (socket open, no frame, no pong) after 2,000 output bytes: only
    // the build stage's follower gets that far, twice for this ~5 KB stage.
    let env2 = Env::start("").await;
    env2.emu.faults().stall_execs_after(2000, 1000);
    let stalled = env2
        .runner()
        .run(&JobBuilder::new(6401).script(&BURSTY).build())
        .await;
    assert_eq!(
        stalled.result,
        JobResult::BuildFailure { exit_code: 7 },
        "{}",
        stalled.log
    );
    let a = between(
        &clean.log,
        "line-1-",
        "line-200-abcdefghijklmnopqrstuvwxyz\n",
    );
    let b = between(
        &stalled.log,
        "line-1-",
        "line-200-abcdefghijklmnopqrstuvwxyz\n",
    );
    assert!(a.len() > 5000, "{a}");
    assert_eq!(a, b, "stage output differs after dead streams");
    let silent = env2
        .events()
        .iter()
        .filter(|e| {
            e["event"] == "exec_reconnect"
                && e["error"].as_str().is_some_and(|s| s.contains("silent"))
        })
        .count();
    assert!(silent >= 2, "dead streams were not detected: {silent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_closed_every_200ms_miss_no_transition() {
    let env = Env::start("[spot]\npolicy = \"require\"\n").await;
    env.emu
        .faults()
        .close_watches_every(Duration::from_millis(200));
    // Pending → Running during prepare.
    let out = env
        .runner()
        .run(&JobBuilder::new(6501).script(&["echo watched"]).build())
        .await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(out.log.contains("watched"));
    // Running → Failed (preempted) → DELETED during a stage.
    let job = JobBuilder::new(6502)
        .script(&["echo started", "sleep 30"])
        .build();
    let runner = env.runner();
    let handle = tokio::spawn(async move { runner.run(&job).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    let node = loop {
        let started = env.events().iter().any(|e| {
            e["event"] == "stage_start" && e["stage"] == "build_script" && e["job_id"] == "6502"
        });
        let node = env.pods().await.iter().find_map(|p| {
            p.metadata
                .name
                .as_deref()?
                .ends_with("-6502")
                .then_some(())?;
            p.spec.as_ref()?.node_name.clone()
        });
        if let (true, Some(n)) = (started, node) {
            break n;
        }
        assert!(Instant::now() < deadline, "build_script never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.emu.faults().preempt_node(&node);
    let out = tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("the preemption was noticed")
        .unwrap();
    env.emu.faults().close_watches_every(Duration::ZERO);
    assert!(
        matches!(out.result, JobResult::SystemFailure { .. }),
        "{:?}\n{}",
        out.result,
        out.log
    );
    assert!(
        out.log.contains(&format!("preempted on node {node}")),
        "{}",
        out.log
    );
    assert!(
        env.events()
            .iter()
            .any(|e| e["event"] == "preemption_recorded"),
        "no preemption event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_ten_random_points_then_cleanup_leaves_no_pod_or_secret() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("SPOTRUN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("seed {seed} (rerun with SPOTRUN_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = Env::start("").await;
    // Image pulls take 1.5 s, so prepare lasts long enough to be hit anywhere; every exec takes
    // 400 ms to start (a real one crosses API server, kubelet and runtime), so the short stages
    // the runner generates (one exec, ~15 ms in a release build) last long enough too. Each
    // latest signal time stays 250 ms or more inside its stage: a timer firing late on a loaded
    // machine still lands in the stage.
    env.emu.faults().delay_pulls(Duration::from_millis(1500));
    env.emu.faults().delay_execs(Duration::from_millis(400));
    // (stage, latest signal time): every point lands while its stage still runs.
    let points = [
        ("prepare", 800),
        ("prepare_script", 150),
        ("get_sources", 150),
        ("build_script", 1500),
        ("after_script", 800),
    ];
    for i in 0..10u64 {
        let (stage, max_ms) = points[rng.random_range(0..points.len())];
        let after = Duration::from_millis(rng.random_range(0..max_ms));
        let job_id = 6600 + i;
        let job = JobBuilder::new(job_id)
            .script(&["echo one", "sleep 2", "echo two"])
            .after_script(&["echo after", "sleep 2"])
            .build();
        let cancel = Cancel {
            stage: stage.into(),
            after,
            mode: CancelMode::Abort,
        };
        let out = env.runner().run_with(&job, Some(cancel)).await;
        println!("point {i}: {stage} + {after:?} → {:?}", out.result);
        let hit = out
            .stage(stage)
            .is_some_and(|s| s.exit_after_sigterm.is_some());
        assert!(
            hit,
            "point {i}: SIGTERM did not land in {stage}\n{}",
            out.log
        );
        if let Some(s) = out.stages.iter().find(|s| s.exit_after_sigterm.is_some()) {
            assert!(!s.killed, "{} needed SIGKILL after SIGTERM", s.stage);
        }
        assert!(
            env.no_pods_within(Duration::from_secs(20)).await,
            "point {i} ({stage} + {after:?}): a pod was left\n{}",
            out.log
        );
        assert!(
            env.secrets().await.is_empty(),
            "point {i} ({stage} + {after:?}): a secret was left"
        );
    }
}
