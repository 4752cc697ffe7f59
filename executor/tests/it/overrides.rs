//! The Kubernetes executor's job variables (issue 17, item 2) through the runner and the emulator:
//! the pod gets what the operator allows, capped values warn once, malformed ones fail clearly.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use spotrun_testkit::harness::{JobBuilder, JobOutcome, JobResult};

use crate::support::Env;

/// Runs a job whose build sleeps a few seconds and returns its outcome and its pod as created
/// (read while the job runs; the pod exists from prepare until cleanup).
async fn run_and_capture_pod(
    env: &Env,
    job: spotrun_testkit::harness::JobSpec,
) -> (JobOutcome, Option<Pod>) {
    let id = job.id.to_string();
    let runner = env.runner();
    let mut handle = tokio::spawn(async move { runner.run(&job).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pod = None;
    let out = loop {
        if pod.is_none() {
            // This job's pod: an earlier job's may still be terminating.
            pod = env.pods().await.into_iter().find(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("job.runner.gitlab.com/id"))
                    == Some(&id)
            });
        }
        tokio::select! {
            r = &mut handle => break r.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        assert!(Instant::now() < deadline, "job did not finish");
    };
    (out, pod)
}

fn build_limit(pod: &Pod, resource: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0]
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get(resource)
        .map(|q| q.0.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_memory_limit_under_and_over_the_cap() {
    let env = Env::start("[resources.build]\nmemory_limit_overwrite_max_allowed = \"2Gi\"\n").await;
    // Under the maximum: applied as asked.
    let job = JobBuilder::new(5201)
        .variable("KUBERNETES_MEMORY_LIMIT", "1Gi")
        .script(&["sleep 3"])
        .build();
    let (out, pod) = run_and_capture_pod(&env, job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert_eq!(
        build_limit(&pod.expect("pod seen"), "memory").as_deref(),
        Some("1Gi")
    );
    assert!(
        out.log
            .contains("Using KUBERNETES_MEMORY_LIMIT=1Gi (maximum 2Gi)"),
        "{}",
        out.log
    );
    assert!(!out.log.contains("WARNING: KUBERNETES"), "{}", out.log);
    // Over it: the maximum, one warning line, and the job runs.
    let job = JobBuilder::new(5202)
        .variable("KUBERNETES_MEMORY_LIMIT", "3Gi")
        .script(&["sleep 3"])
        .build();
    let (out, pod) = run_and_capture_pod(&env, job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert_eq!(
        build_limit(&pod.expect("pod seen"), "memory").as_deref(),
        Some("2Gi")
    );
    let warnings: Vec<&str> = out
        .log
        .lines()
        .filter(|l| l.contains("KUBERNETES_MEMORY_LIMIT"))
        .collect();
    assert_eq!(
        warnings,
        [
            "WARNING: KUBERNETES_MEMORY_LIMIT=3Gi is over the maximum 2Gi (resources.build.memory_limit_overwrite_max_allowed); using 2Gi"
        ],
        "{}",
        out.log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_disallowed_overrides_are_named() {
    let env = Env::start("[resources.build]\ncpu_limit_overwrite_max_allowed = \"2\"\n").await;
    // Malformed: a build failure naming the variable and what is wrong, before any pod exists.
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5203)
                .variable("KUBERNETES_CPU_LIMIT", "abc")
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
        out.log.contains(
            "KUBERNETES_CPU_LIMIT=\"abc\" is not allowed: \"abc\" is not a Kubernetes quantity"
        ),
        "{}",
        out.log
    );
    assert!(env.pods().await.is_empty());
    // Not allowed by the operator: ignored with exactly one warning line each, the job runs.
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5204)
                .variable("KUBERNETES_MEMORY_LIMIT", "1Gi")
                .variable("KUBERNETES_NODE_SELECTOR_ARCH", "kubernetes.io/arch=arm64")
                .script(&["echo ran"])
                .build(),
        )
        .await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    for var in ["KUBERNETES_MEMORY_LIMIT", "KUBERNETES_NODE_SELECTOR_ARCH"] {
        let lines: Vec<&str> = out.log.lines().filter(|l| l.contains(var)).collect();
        assert_eq!(lines.len(), 1, "{var}: {lines:?}");
        assert!(
            lines[0].starts_with("WARNING: ") && lines[0].contains("is not set"),
            "{lines:?}"
        );
    }
}

/// `KUBERNETES_NAMESPACE_OVERWRITE` within the operator's expression: prepare, every stage and
/// cleanup find the pod in the job's namespace (each subcommand derives it on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_overwrite_is_used_by_every_subcommand() {
    let mut cfg = spotrun_testkit::emulator::EmulatorConfig::gke();
    cfg.namespaces.push("ci-team-a".into());
    let env = Env::start_with(cfg, "namespace_overwrite_allowed = \"^ci-team-\"\n").await;
    let job = JobBuilder::new(5205)
        .variable("KUBERNETES_NAMESPACE_OVERWRITE", "ci-team-a")
        .script(&["echo in-team-namespace"])
        .after_script(&["echo after-too"])
        .build();
    let out = env.runner().run(&job).await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(out.log.contains("Creating pod ci-team-a/"), "{}", out.log);
    assert!(out.log.contains("in-team-namespace") && out.log.contains("after-too"));
    // Cleanup found it there too: nothing left in the job's namespace.
    let api: kube::Api<Pod> = kube::Api::namespaced(env.emu.client().await, "ci-team-a");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = api
            .list(&kube::api::ListParams::default())
            .await
            .unwrap()
            .items;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cleanup left {} pod(s)",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A namespace outside the expression: one warning, the operator's namespace.
    let out = env
        .runner()
        .run(
            &JobBuilder::new(5206)
                .variable("KUBERNETES_NAMESPACE_OVERWRITE", "kube-system")
                .script(&["echo ok"])
                .build(),
        )
        .await;
    assert_eq!(out.result, JobResult::Success, "{}", out.log);
    assert!(out.log.contains("Creating pod ci-jobs/"), "{}", out.log);
    let lines: Vec<&str> = out
        .log
        .lines()
        .filter(|l| l.contains("KUBERNETES_NAMESPACE_OVERWRITE"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("WARNING: ")
            && lines[0].contains("does not match namespace_overwrite_allowed"),
        "{lines:?}"
    );
}
